"""Compile every Triton kernel of tidemind (KV cache, attention, W4A16, norms, rotary, activations) for
an H200 (sm_90) on a machine without a GPU, and report each variant's registers, spills and shared
memory (cuobjdump on the cubin).

    python benchmarks/compile_sm90.py            # every variant below; exit code 1 if one fails
    python benchmarks/compile_sm90.py w4a16      # only the variants whose name contains "w4a16"
    python benchmarks/compile_sm90.py --quick    # one shape per kernel, default tiles only (CI: ~20 s)

Triton's interpreter (the CPU tests) checks what a kernel computes, not what the GPU compiler
accepts (tl.dot shapes, constexpr use, layouts) nor what it costs (register spills). This script
calls the real launchers with CPU tensors of the real shapes, catches each kernel launch before it
runs (JITFunction.run), and compiles that launch -- signature, constexprs, warps and stages -- with
Triton's own ptxas for sm_90. Must run without TRITON_INTERPRET (it unsets it).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # gpu_quant's sweep lists
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from tidemind.kernels import decode_attention, kv_cache, prefill_attention, reference  # noqa: E402
from tidemind.kernels.rotary_kv_cache import rotary_write_kv_cache  # noqa: E402
from tidemind.kernels import (activation, rms_norm, rotary, w4a16_dequant, w4a16_gemm, w4a16_gemv,  # noqa: E402
                              w4a16_gemv_slabs, w4a16_layout)

_LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")


def captured_launches(launch) -> list:
    """[(kernel, bound arguments, launch options)] of every kernel launch `launch()` makes."""
    launches = []

    def capture(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
        launches.append((self, self.signature.bind(*args, **kwargs).arguments, options))

    original = JITFunction.run
    JITFunction.run = capture
    try:
        launch()
    finally:
        JITFunction.run = original
    return launches


def compile_launch(kernel, arguments: dict, options: dict):
    """triton.compile of one launch, specialized as JITFunction.run would (ints equal to 1 become
    constants; pointers and ints divisible by 16 say so)."""
    signature, constexprs, attrs = {}, {}, {}
    for index, param in enumerate(kernel.params):
        value = arguments[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[(index,)] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, not param.do_not_specialize,
                                            not param.do_not_specialize_on_alignment)
        signature[param.name] = kind
        if kind == "constexpr":
            constexprs[(index,)] = spec
        elif isinstance(spec, str):
            attrs[(index,)] = BaseBackend.parse_attr(spec)
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def resource_usage(compiled) -> str:
    """cuobjdump's 'REG:.. STACK:.. SHARED:.. ...' line of the compiled cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return next((line.strip() for line in out.splitlines() if "REG:" in line), "?")


def quantized_cache(num_blocks, block_size, num_kv_heads, head_dim, bits, dtype):
    """(key_cache, value_cache, quant kwargs) of the layout attention/kv_cache.py describes."""
    if not bits:
        cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim, dtype=dtype)
        return cache[0], cache[1], {}
    cache = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim * bits // 8, dtype=torch.uint8)
    scales = torch.zeros(2, num_blocks, block_size, num_kv_heads, 2, dtype=torch.float16)
    return cache[0], cache[1], {"key_scales": scales[0], "value_scales": scales[1], "kv_bits": bits}


QUICK = "--quick" in sys.argv


def variants():
    """(name, launch) pairs: the model shapes the engine runs (llama8b, Gemma 3, SmolLM2), bf16."""
    dtype = torch.bfloat16
    shapes = ((32, 8, 128, None), (4, 1, 256, 512), (9, 3, 64, None))
    for bits in (0, 8, 4):
        for heads, kv_heads, head_dim, window in shapes[:1] if QUICK else shapes:
            key_cache, value_cache, quant = quantized_cache(8, 64, kv_heads, head_dim, bits, dtype)
            tables = torch.zeros(4, 8, dtype=torch.int32)
            seq_lens = torch.full((4,), 300, dtype=torch.int32)
            shape = f"H{heads}/KVH{kv_heads} D{head_dim} int{bits or 16}"

            def write(kv_heads=kv_heads, head_dim=head_dim, key_cache=key_cache, value_cache=value_cache,
                      quant=quant):
                key = torch.zeros(4, kv_heads, head_dim, dtype=dtype)
                kv_cache.write_kv_cache(key, key, key_cache, value_cache, torch.zeros(4, dtype=torch.int32), **quant)

            def rotary_write(heads=heads, kv_heads=kv_heads, head_dim=head_dim, key_cache=key_cache,
                             value_cache=value_cache, quant=quant):
                qkv = torch.zeros(4, heads + 2 * kv_heads, head_dim, dtype=dtype)
                query, key, value = qkv.split([heads, kv_heads, kv_heads], dim=1)
                rotary_write_kv_cache(query, key, value, key_cache, value_cache, torch.zeros(4, dtype=torch.int32),
                                      torch.zeros(4, dtype=torch.int64),
                                      torch.zeros(8192, head_dim, dtype=torch.float32), **quant)

            def decode(heads=heads, head_dim=head_dim, key_cache=key_cache, value_cache=value_cache, quant=quant,
                       tables=tables, seq_lens=seq_lens, window=window):
                query = torch.zeros(4, heads, head_dim, dtype=dtype)
                decode_attention.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens, 0.1, window,
                                                        300, **quant)

            def prefill(heads=heads, head_dim=head_dim, key_cache=key_cache, value_cache=value_cache, quant=quant,
                        tables=tables, seq_lens=seq_lens, window=window):
                query = torch.zeros(400, heads, head_dim, dtype=dtype)
                starts = torch.tensor([0, 100, 200, 300, 400], dtype=torch.int32)
                prefill_attention.paged_prefill_attention(query, key_cache, value_cache, tables, seq_lens, starts,
                                                          100, 0.1, window, **quant)

            yield f"write_kv_cache   {shape}", write
            yield f"rotary+write_kv  {shape}", rotary_write
            yield f"decode (split)   {shape}", decode
            yield f"prefill          {shape}", prefill
    yield from w4a16_variants(dtype)
    yield from elementwise_variants(dtype)


def elementwise_variants(dtype):
    """The per-token kernels at llama8b's widths (hidden 4096, 32 / 8 heads of 128, MLP 14336)."""
    x = torch.zeros(64, 4096, dtype=dtype)
    weight = torch.zeros(4096, dtype=dtype)
    yield "rms_norm", lambda: rms_norm.rms_norm(x, weight, 1e-5)
    yield "add_rms_norm", lambda: rms_norm.add_rms_norm(x.clone(), x.clone(), weight, 1e-5)
    qkv = torch.zeros(64, 6144, dtype=dtype)
    yield "rotary_embedding", lambda: rotary.rotary_embedding(qkv[:, :4096], qkv[:, 4096:5120],
                                                              torch.zeros(64, dtype=torch.int64),
                                                              torch.zeros(8192, 128, dtype=torch.float32))
    gate_up = torch.zeros(64, 2 * 14336, dtype=dtype)
    yield "silu_and_mul", lambda: activation.silu_and_mul(gate_up)
    yield "gelu_tanh_and_mul", lambda: activation.gelu_tanh_and_mul(gate_up)


def w4a16_variants(dtype):
    """The W4A16 kernels at llama8b's down projection (K 14336 -> N 4096, group 128): the GEMV for
    1..4 rows and the configurations benchmarks/gpu_quant.py sweeps, the GEMM's, the dequantizer."""
    k, n, group = 14336, 4096, 128
    qweight = torch.zeros(k, n // 8, dtype=torch.int32)
    qzeros = torch.zeros(k // group, n // 8, dtype=torch.int32)
    scales = torch.zeros(k // group, n, dtype=torch.float16)
    slabs = torch.zeros(k // w4a16_layout.SLAB, n, w4a16_layout.SLAB_WORDS, dtype=torch.int32)
    from gpu_quant import GEMM_SWEEP, GEMV_SWEEP, SLAB_GEMV_SWEEP  # the configurations the GPU run times

    import dataclasses

    if QUICK:
        GEMV_SWEEP, GEMM_SWEEP, SLAB_GEMV_SWEEP = [], [], []  # noqa: N806 (the defaults only)
    compiled_alike = [dataclasses.replace(c, programs_per_sm=1)
                      for c in (w4a16_gemv.DEFAULT_CONFIG, w4a16_gemv.FEW_ROWS_CONFIG, *GEMV_SWEEP)]
    for rows in (1, 4) if QUICK else (1, 2, 4):
        for config in dict.fromkeys(compiled_alike):  # programs_per_sm is a host value: one compile
            yield (f"w4a16_gemv M{rows} {config}",
                   lambda rows=rows, config=config: w4a16_gemv.w4a16_gemv(torch.zeros(rows, k, dtype=dtype), qweight,
                                                                          qzeros, scales, group, config))
    slab_alike = [dataclasses.replace(c, programs_per_sm=1)
                  for c in (w4a16_gemv_slabs.DEFAULT_CONFIG, *SLAB_GEMV_SWEEP)]
    for rows in (1, 4) if QUICK else (1, 2, 4):
        for config in dict.fromkeys(slab_alike):
            yield (f"w4a16_gemv_slabs M{rows} {config}",
                   lambda rows=rows, config=config: w4a16_gemv_slabs.w4a16_gemv_slabs(
                       torch.zeros(rows, k, dtype=dtype), slabs, qzeros, scales, group, config))
    for config in dict.fromkeys((w4a16_gemm.default_config(256, n), *GEMM_SWEEP)):
        for weights, layout in ((qweight, ""), (slabs, " slabs")):
            yield (f"w4a16_gemm{layout} {config}",
                   lambda config=config, weights=weights: w4a16_gemm.w4a16_gemm(
                       torch.zeros(256, k, dtype=dtype), weights, qzeros, scales, group, config))
    for weights, layout in ((qweight, ""), (slabs, " slabs")):
        yield (f"w4a16_dequantize{layout}",
               lambda weights=weights: w4a16_dequant.w4a16_dequantize(weights, qzeros, scales, group, dtype))


def main() -> int:
    assert reference  # the layout's definition; imported so a broken reference fails here too
    failures = 0
    wanted = next((a for a in sys.argv[1:] if not a.startswith("--")), "")
    for name, launch in variants():
        if wanted not in name:
            continue
        for kernel, arguments, options in captured_launches(launch):
            start = time.perf_counter()
            try:
                usage = resource_usage(compile_launch(kernel, arguments, options))
            except Exception as e:  # report every variant, then fail
                failures += 1
                usage = f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            print(f"{name}  {kernel.__name__:<30} {options}  {time.perf_counter() - start:5.1f} s  {usage}",
                  flush=True)
    print("all compiled" if not failures else f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
