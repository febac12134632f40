"""runner/kernel_precompile.py: the recorder notes Triton launches without running them (CPU), and
on a GPU the kernels compiled side by side are the ones the real launches then use (no compile
left for them), with the results the launches give without precompiling."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tidemind.runner.kernel_precompile import precompile_kernels, recorded_launches  # noqa: E402

ON_GPU = torch.cuda.is_available()


def _scale(src_ptr, dst_ptr, n, factor, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst_ptr + offsets, tl.load(src_ptr + offsets, mask=mask) * factor, mask=mask)


def test_recorder_notes_every_launch_and_runs_none():
    kernel = JITFunction(_scale)  # compiled (not interpreted) even under TRITON_INTERPRET
    src, dst = torch.ones(40), torch.zeros(40)

    def work():
        for block in (16, 32):
            kernel[(triton.cdiv(40, block),)](src, dst, 40, 2.0, BLOCK=block, num_warps=1)

    original = JITFunction.run
    launches = recorded_launches(work)
    assert [(fn, kwargs["BLOCK"], kwargs["num_warps"]) for fn, _, kwargs in launches] == [(kernel, 16, 1),
                                                                                        (kernel, 32, 1)]
    assert launches[0][1][:4] == (src, dst, 40, 2.0)
    assert torch.equal(dst, torch.zeros(40))  # nothing ran
    assert JITFunction.run is original  # restored


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
def test_precompiled_kernels_are_the_ones_launches_use(monkeypatch):
    kernel = triton.jit(_scale)  # a fresh kernel: nothing of it compiled in this process
    src = torch.arange(1000, dtype=torch.float32, device="cuda")
    outs = {block: torch.zeros_like(src) for block in (64, 128, 256)}

    def work():
        for block, dst in outs.items():
            kernel[(triton.cdiv(1000, block),)](src, dst, 1000, 3.0, BLOCK=block)

    compiled = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", lambda *a, **k: compiled.append(1))
    launches, _ = precompile_kernels(work, workers=3)
    assert launches == 3 and len(compiled) == 3
    assert all(torch.equal(dst, torch.zeros_like(src)) for dst in outs.values())  # compiled, not run
    work()
    assert len(compiled) == 3  # the launches compiled nothing more
    for dst in outs.values():
        torch.testing.assert_close(dst, src * 3.0)
