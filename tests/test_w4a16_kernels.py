"""The W4A16 Triton kernels (kernels/w4a16_gemv.py, kernels/w4a16_gemv_slabs.py, kernels/w4a16_gemm.py,
kernels/w4a16_dequant.py; AutoAWQ's layout and K slabs; K split as kernels/split_k.py does) against
dequantize-then-matmul (awq_dequantize), on odd shapes: M = 1 .. 64 rows, N not a multiple
of the column tiles, K of a few groups, group sizes 16 .. 128, K split across programs, tile
configurations of the kinds the benchmarks sweep.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py)
in float32 and float16; on a GPU the same tests run natively, bfloat16 too.

Tolerances (relative to the largest |output|): float32 1e-5: both sides compute in float32, only
the summation order differs. float16 / bfloat16: the kernels round the dequantized weight tile to
the input dtype before tl.dot (the GEMV keeps float32) while the reference stays in float32:
one rounding of each weight (2^-11 / 2^-8 relative) averaged over K terms: 2e-3 / 1.5e-2.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from tidemind.kernels.w4a16_dequant import w4a16_dequantize  # noqa: E402
from tidemind.kernels.w4a16_gemm import GemmConfig, w4a16_gemm  # noqa: E402
from tidemind.kernels import split_k  # noqa: E402
from tidemind.kernels.w4a16_gemv import GemvConfig, split_count, w4a16_gemv  # noqa: E402
from tidemind.kernels.w4a16_gemv_slabs import SlabGemvConfig, w4a16_gemv_slabs  # noqa: E402
from tidemind.kernels.w4a16_layout import awq_to_slabs, slabs_to_awq  # noqa: E402
from tidemind.layers.quantization.awq import awq_dequantize  # noqa: E402
from tidemind.layers.quantization.packing import pack_awq, unpack_awq  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def awq_tensors(k: int, n: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // group, n), generator=gen)
    s = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half()
    return pack_awq(q).to(DEVICE), pack_awq(z).to(DEVICE), s.to(DEVICE)


def check(kernel, m: int, k: int, n: int, group: int, dtype: torch.dtype, config=None) -> None:
    qweight, qzeros, scales = awq_tensors(k, n, group, seed=m + k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    expected = x.float() @ awq_dequantize(qweight, qzeros, scales, group, torch.float32)
    actual = kernel(x, qweight, qzeros, scales, group, config=config)
    assert actual.dtype == dtype and actual.shape == (m, n)
    scale = expected.abs().max().item()
    err = (actual.float() - expected).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err:.3g} against outputs up to {scale:.3g}"


# (K, N, group): N not a multiple of the column tiles (64 / 128 / 256), K not of 128 where the group allows
SHAPES = [(96, 200, 32), (192, 72, 64), (256, 136, 128), (48, 8, 16)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n,group", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 17, 64])
def test_gemm_matches_dequantize_then_matmul(m, k, n, group, dtype):
    check(w4a16_gemm, m, k, n, group, dtype)


@pytest.mark.parametrize("config", [GemmConfig(16, 64, 32, swap_ab=True), GemmConfig(32, 128, 64, swap_ab=True),
                                    GemmConfig(64, 64, 16, num_warps=8)], ids=str)
@pytest.mark.parametrize("m", [5, 40])
def test_gemm_configs_match_dequantize_then_matmul(m, config):
    # the swept tiles, the transposed (swap_ab) form included, on N and M not multiples of them
    check(w4a16_gemm, m, 192, 200, 64, torch.float16, config)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n,group", SHAPES + [(256, 64, 32)])
@pytest.mark.parametrize("m", [1, 3, 4])
def test_gemv_matches_dequantize_then_matmul(m, k, n, group, dtype):
    check(w4a16_gemv, m, k, n, group, dtype)


@pytest.mark.parametrize("config", [GemvConfig(block_n=64, block_k=16, programs_per_sm=64),
                                    GemvConfig(block_n=64, block_k=16, programs_per_sm=64, stages=1),
                                    GemvConfig(block_n=128, block_k=16, programs_per_sm=2, stages=3),
                                    GemvConfig(block_n=256, block_k=128, num_warps=8, programs_per_sm=1),
                                    GemvConfig(block_n=64, block_k=16, programs_per_sm=64, stages=2),
                                    GemvConfig(block_n=128, block_k=32, programs_per_sm=1, stages=5)], ids=str)
@pytest.mark.parametrize("m", [1, 2])
def test_gemv_configs_match_dequantize_then_matmul(m, config):
    # many K shares reduced in one launch (the last program to arrive adds them), or none; software
    # pipelines of 1 to 5 stages
    check(w4a16_gemv, m, 512, 136, 32, torch.float32, config)


def dequantize_then_matmul(x, qweight, qzeros, scales, group, config=None):
    return x @ w4a16_dequantize(qweight, qzeros, scales, group, x.dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel,m,config", [
    (w4a16_gemv_slabs, 1, SlabGemvConfig(block_n=64, num_warps=2, programs_per_sm=64, stages=2)),
    (w4a16_gemv_slabs, 2, SlabGemvConfig(block_n=128, num_warps=1, programs_per_sm=1, stages=3)),
    (w4a16_gemv_slabs, 4, None), (w4a16_gemv_slabs, 3, SlabGemvConfig(block_n=256, programs_per_sm=64)),
    (w4a16_gemm, 5, GemmConfig(16, 64, 32)), (w4a16_gemm, 17, GemmConfig(32, 128, 64, swap_ab=True)),
    (w4a16_gemm, 40, GemmConfig(16, 64, 16)), (dequantize_then_matmul, 3, None)],
    ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("k,n,group", [(256, 200, 64), (96, 72, 32), (512, 136, 128)])
def test_kernels_on_slabs_match_dequantize_then_matmul(kernel, m, config, k, n, group, dtype):
    # weights repacked into K slabs (awq_to_slabs) give what AutoAWQ's layout gives: N not a multiple
    # of the column tiles, K split into many shares or none, tiles of 16 K rows (half a slab) and more
    qweight, qzeros, scales = awq_tensors(k, n, group, seed=k + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    expected = x.float() @ awq_dequantize(qweight, qzeros, scales, group, torch.float32)
    actual = kernel(x, awq_to_slabs(qweight), qzeros, scales, group, config=config)
    assert actual.dtype == dtype and actual.shape == (m, n)
    assert (actual.float() - expected).abs().max().item() <= TOL[dtype] * expected.abs().max().item()


def test_slabs_round_trip_and_layout():
    qweight = awq_tensors(64, 16, 32)[0]
    slabs = awq_to_slabs(qweight)
    assert slabs.shape == (2, 16, 4)
    assert torch.equal(slabs_to_awq(slabs), qweight)
    # word j of column n in slab t holds k = 32t + 8j + i at the nibble AutoAWQ gives column i
    values = unpack_awq(qweight)  # [K, N]
    t, n, j = 1, 5, 2
    assert torch.equal(unpack_awq(slabs[t, n, j].view(1, 1)).view(8), values[32 * t + 8 * j:32 * t + 8 * j + 8, n])


def test_slab_kernels_refuse_what_they_cannot_read():
    qweight, qzeros, scales = awq_tensors(96, 64, 16)
    slabs = awq_to_slabs(qweight)
    x = torch.randn(1, 96).to(DEVICE)
    with pytest.raises(ValueError, match="multiple of 32"):
        w4a16_gemv_slabs(x, slabs, qzeros, scales, 16)
    with pytest.raises(ValueError, match="multiple of 32"):
        w4a16_gemm(x, slabs, qzeros, scales, 16)
    with pytest.raises(ValueError, match="slabs take w4a16_gemv_slabs"):
        w4a16_gemv(x, slabs, qzeros, scales, 16)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        awq_to_slabs(awq_tensors(48, 16, 16)[0])


@pytest.mark.parametrize("m", [1, 3])
def test_gemv_reads_bfloat16_scales(m):
    # the kernel reads the scales as int32 pairs and widens them itself: bfloat16 by a shift
    qweight, qzeros, scales = awq_tensors(256, 136, 64, seed=7)
    scales = scales.to(torch.bfloat16)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    expected = x @ awq_dequantize(qweight, qzeros, scales, 64, torch.float32)
    err = (w4a16_gemv(x, qweight, qzeros, scales, 64) - expected).abs().max().item()
    assert err <= TOL[torch.float32] * expected.abs().max().item()


@pytest.mark.parametrize("m", [1, 3])
def test_gemv_reads_16_bit_x_off_four_byte_boundaries(m):
    # x rows that start at odd element offsets cannot be read as int32 pairs: the kernel reads them
    # one element at a time instead
    qweight, qzeros, scales = awq_tensors(128, 72, 32, seed=5)
    wide = torch.randn(m, 129, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.float16)
    x = wide[:, 1:]  # row stride 129, storage offset 1
    expected = x.float() @ awq_dequantize(qweight, qzeros, scales, 32, torch.float32)
    actual = w4a16_gemv(x, qweight, qzeros, scales, 32)
    assert (actual.float() - expected).abs().max().item() <= TOL[torch.float16] * expected.abs().max().item()


def test_gemv_refuses_float32_scales():
    qweight, qzeros, scales = awq_tensors(64, 64, 32)
    with pytest.raises(ValueError, match="scales must be float16 or bfloat16"):
        w4a16_gemv(torch.randn(1, 64, device=DEVICE), qweight, qzeros, scales.float(), 32)


def test_gemv_reads_no_group_past_the_last_split(monkeypatch):
    # 10 groups in 3 splits of 4: the last holds 2; were it to walk as far as the others, it would
    # read the scales and zeros of the groups past K, here NaN
    monkeypatch.setattr(split_k, "sm_count", lambda device: 1)  # 3 programs per SM -> 3 splits
    qweight, qzeros, scales = awq_tensors(320, 64, 32, seed=3)
    padded = torch.full((scales.shape[0] + 4, scales.shape[1]), float("nan"), dtype=scales.dtype, device=DEVICE)
    padded[: scales.shape[0]] = scales
    scales = padded[: scales.shape[0]]
    assert split_count(64, 320, 32, 64, DEVICE, programs_per_sm=3) == 3
    x = torch.randn(1, 320, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    expected = x @ awq_dequantize(qweight, qzeros, scales, 32, torch.float32)
    actual = w4a16_gemv(x, qweight, qzeros, scales, 32, GemvConfig(block_n=64, block_k=16, programs_per_sm=3))
    assert torch.isfinite(actual).all()
    assert (actual - expected).abs().max().item() <= TOL[torch.float32] * expected.abs().max().item()


def test_gemv_arrival_counters_are_reset_for_the_next_launch():
    # a counter left non-zero makes the next launch's reduction run early, on missing partials
    config = GemvConfig(block_n=64, block_k=32, programs_per_sm=64)
    for seed in range(3):
        check(w4a16_gemv, 1, 256 + 32 * seed, 128, 32, torch.float32, config)


@pytest.mark.parametrize("slabs", [False, True], ids=["awq", "slabs"])
@pytest.mark.parametrize("config", [GemmConfig(16, 64, 32, programs_per_sm=64),
                                    GemmConfig(32, 64, 16, swap_ab=True, programs_per_sm=64)], ids=str)
def test_gemm_splits_k_when_tiles_are_few(config, slabs):
    # 2 x 4 output tiles and 64 programs wanted a SM: K split into its BLOCK_K tiles (320 / 32 = 10,
    # or 20 of 16), the last program of each tile adding the splits; run twice, the arrival
    # counters must be back at 0 for the second launch
    qweight, qzeros, scales = awq_tensors(320, 200, 32, seed=4)
    weights = awq_to_slabs(qweight) if slabs else qweight
    for m in (17, 30):
        x = torch.randn(m, 320, generator=torch.Generator().manual_seed(m)).to(DEVICE)
        expected = x @ awq_dequantize(qweight, qzeros, scales, 32, torch.float32)
        actual = w4a16_gemm(x, weights, qzeros, scales, 32, config)
        assert (actual - expected).abs().max().item() <= TOL[torch.float32] * expected.abs().max().item()


def test_gemv_refuses_more_rows_than_it_takes():
    qweight, qzeros, scales = awq_tensors(64, 64, 32)
    with pytest.raises(ValueError, match="at most 4 rows, got 5"):
        w4a16_gemv(torch.randn(5, 64, device=DEVICE), qweight, qzeros, scales, 32)


def test_gemv_splits_k_when_columns_are_few():
    # one program's worth of columns: K is split (in whole groups) so the GPU is not left idle
    assert split_count(64, 256, 32, 64, DEVICE) > 1
    assert split_count(4096, 4096, 128, 256, torch.device("cpu"), programs_per_sm=1) == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k,n,group", SHAPES)
def test_dequantize_matches_the_reference(k, n, group, dtype):
    qweight, qzeros, scales = awq_tensors(k, n, group)
    expected = awq_dequantize(qweight, qzeros, scales, group, torch.float32).to(dtype)
    actual = w4a16_dequantize(qweight, qzeros, scales, group, dtype)
    assert actual.dtype == dtype and torch.equal(actual, expected)  # both round float32 once


def test_bad_arguments_are_refused():
    qweight, qzeros, scales = awq_tensors(96, 64, 32)
    x = torch.randn(2, 96, device=DEVICE)
    with pytest.raises(ValueError, match="group size 40 must divide K=96"):
        w4a16_gemm(x, qweight, qzeros, scales, 40)
    with pytest.raises(ValueError, match="qweight must be a contiguous int32 \\[80"):
        w4a16_gemv(torch.randn(2, 80, device=DEVICE), qweight, qzeros, scales, 32)


# ---- real sizes and CUDA graphs, GPU only -------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("k,n", [(4096, 6144), (14336, 4096)])
@pytest.mark.parametrize("m", [1, 4, 5, 64, 65, 1024, 3000])
@pytest.mark.parametrize("slabs", [False, True], ids=["awq", "slabs"])
def test_dispatch_at_llama8b_sizes(m, k, n, slabs):
    # what the AWQ method runs: the GEMV up to its MAX_ROWS rows, the GEMM above, dequantize + matmul
    # from DEQUANT_MIN_ROWS, on either layout
    from tidemind.layers.quantization.awq import w4a16_matmul

    qweight, qzeros, scales = awq_tensors(k, n, 128)
    x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
    expected = x.float() @ awq_dequantize(qweight, qzeros, scales, 128, torch.float32)
    actual = w4a16_matmul(x, awq_to_slabs(qweight) if slabs else qweight, qzeros, scales, 128, use_triton=True)
    assert (actual.float() - expected).abs().max() <= TOL[torch.bfloat16] * expected.abs().max()


@pytest.mark.parametrize("m", [1, 4, 5, 300])
def test_dispatch_on_slabs(m):
    # the AWQ method on slabs at every row count's kernel (GEMV, GEMM, dequantize + matmul); on the
    # CPU under the interpreter
    from tidemind.layers.quantization.awq import w4a16_matmul

    qweight, qzeros, scales = awq_tensors(64, 40, 32)
    x = torch.randn(m, 64, generator=torch.Generator().manual_seed(m)).to(DEVICE)
    expected = x @ awq_dequantize(qweight, qzeros, scales, 32, torch.float32)
    actual = w4a16_matmul(x, awq_to_slabs(qweight), qzeros, scales, 32, use_triton=True)
    torch.testing.assert_close(actual, expected, rtol=0, atol=TOL[torch.float32] * expected.abs().max().item())


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("kernel,m", [(w4a16_gemv, 1), (w4a16_gemm, 32)])
def test_launchers_replay_in_cuda_graphs(kernel, m):
    # the GEMV here splits K (few columns): its partial sums and their reduction are captured too
    qweight, qzeros, scales = awq_tensors(1024, 256, 128)
    x = torch.randn(m, 1024, device=DEVICE, dtype=torch.float16)
    kernel(x, qweight, qzeros, scales, 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel(x, qweight, qzeros, scales, 128)
    x.copy_(torch.randn_like(x))
    graph.replay()
    expected = x.float() @ awq_dequantize(qweight, qzeros, scales, 128, torch.float32)
    assert (out.float() - expected).abs().max() <= TOL[torch.float16] * expected.abs().max()
