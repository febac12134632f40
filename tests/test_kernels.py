"""Every Triton kernel (tidemind/kernels/*.py) against its torch reference (kernels/reference.py).

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set in conftest.py)
at small sizes, in float32 and float16: the interpreter stores bfloat16 as raw 16-bit integers (its
casts truncate and tl.dot multiplies the integers), so bfloat16 is tested on the GPU only, where
the same tests run natively and the `gpu`-marked ones add realistic sizes.

Inputs are fresh random values; caches start as large finite garbage (randn * 1e3) so that reading
an unwritten or masked slot shows up as a large error, and `out=` buffers start as NaN.

Tolerances (rtol = atol), by the input dtype:
  float32  1e-5: both sides round to float32; only the summation order and exp / rsqrt
           implementations differ (a few float32 ulps of values of order 1).
  float16  5e-3 elementwise, 1e-2 attention: the references round every intermediate to float16
           (ulp 2^-10 ~ 1e-3) where the kernels round once; attention adds the probabilities cast
           to float16 before P @ V, as flash attention does.
  bfloat16 2e-2 elementwise, 3e-2 attention: the same with bfloat16's ulp of 2^-7 ~ 8e-3.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from tidemind.kernels import activation, decode_attention, kv_cache, prefill_attention, reference  # noqa: E402
from tidemind.kernels import rms_norm as rms_norm_kernels  # noqa: E402
from tidemind.kernels import rotary  # noqa: E402
from tidemind.kernels.int_to_float import small_int_to_float  # noqa: E402

tl = triton.language

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
ELEMENTWISE_TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}
ATTENTION_TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), rtol=tol, atol=tol)


def randn(*shape, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape).to(dtype=dtype, device=DEVICE)


# ---- rms_norm / add_rms_norm ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden,row_stride,weight_offset", [
    (7, 96, 96, 0.0),     # hidden not a power of two
    (3, 576, 700, 1.0),   # rows of a wider tensor; Gemma's (1 + weight)
    (1, 4096, 4096, 0.0),
])
def test_rms_norm(dtype, num_tokens, hidden, row_stride, weight_offset):
    x = randn(num_tokens, row_stride, dtype=dtype)[:, :hidden]
    weight = randn(hidden, dtype=dtype)
    expected = reference.rms_norm(x, weight, 1e-6, weight_offset)
    assert_close(rms_norm_kernels.rms_norm(x, weight, 1e-6, weight_offset), expected, ELEMENTWISE_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens,hidden,weight_offset", [(5, 96, 0.0), (2, 640, 1.0)])
def test_add_rms_norm(dtype, num_tokens, hidden, weight_offset):
    x = randn(num_tokens, hidden, dtype=dtype)
    residual = randn(num_tokens, hidden + 8, dtype=dtype)[:, :hidden]
    weight = randn(hidden, dtype=torch.float32)
    expected_normed, expected_summed = reference.add_rms_norm(x, residual, weight, 1e-5, weight_offset)
    normed, summed = rms_norm_kernels.add_rms_norm(x, residual, weight, 1e-5, weight_offset)
    # the sum is rounded to the model dtype on both sides: it matches to the bit
    torch.testing.assert_close(summed, expected_summed, rtol=0, atol=0)
    assert summed.data_ptr() == residual.data_ptr() and normed.data_ptr() == x.data_ptr()  # documented in place
    assert_close(normed, expected_normed, ELEMENTWISE_TOL[dtype])


def test_rms_norm_rejects_bad_input():
    with pytest.raises(ValueError, match="last dim must be contiguous"):
        rms_norm_kernels.rms_norm(randn(8, 4).t(), randn(2), 1e-6)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm_kernels.rms_norm(randn(2, 8), randn(4), 1e-6)


# ---- small integers to float (the dequantizing kernels' conversion) --------------------------------


@triton.jit
def _convert_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(dst_ptr + offsets, small_int_to_float(tl.load(src_ptr + offsets, mask=mask, other=0)), mask=mask)


def test_small_int_to_float_is_exact_over_its_range():
    """Every value the kernels convert (uint8 codes, nibbles, nibble differences) and the ends of the
    documented range |v| < 2^22 come out exactly as a plain int-to-float conversion."""
    edge = (1 << 22) - 1
    values = torch.cat([torch.arange(-256, 256), torch.tensor([edge, -edge, edge - 1, -edge + 1, 1 << 21])])
    src = values.to(torch.int32).to(DEVICE)
    dst = torch.full(src.shape, float("nan"), device=DEVICE)
    _convert_kernel[(triton.cdiv(src.numel(), 128),)](src, dst, src.numel(), BLOCK=128)
    assert torch.equal(dst.cpu(), values.to(torch.float32))


# ---- activations ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["silu_and_mul", "gelu_tanh_and_mul"])
@pytest.mark.parametrize("n,d,row_stride", [(5, 100, 200), (3, 1500, 3100)])  # 2 programs per row
def test_activation(dtype, name, n, d, row_stride):
    gate_up = (randn(n, row_stride, dtype=torch.float32) * 4).to(dtype)[:, :2 * d]  # into silu's / gelu's tails
    expected = getattr(reference, name)(gate_up)
    assert_close(getattr(activation, name)(gate_up), expected, ELEMENTWISE_TOL[dtype])


# ---- rotary embedding --------------------------------------------------------------------------


def test_cos_sin_table_is_bit_identical_to_transformers_rotary():
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from tidemind.layers.rotary import RotaryEmbedding, rope_parameters_from_config

    for params in ({"rope_type": "default", "rope_theta": 10000.0},
                   {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256}):
        config = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                                          max_position_embeddings=1024, rope_parameters=params)
        positions = torch.tensor([[0, 1, 7, 300, 1023]])
        cos, sin = LlamaRotaryEmbedding(config=config)(torch.zeros(1, 5, 64), positions)  # [1, 5, 64] each
        table = RotaryEmbedding(64, rope_parameters_from_config(config.to_dict()), 1024).table(torch.device("cpu"))
        torch.testing.assert_close(table[positions[0]], torch.cat((cos[0, :, :32], sin[0, :, :32]), -1),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,position_dtype", [
    (9, 3, 64, torch.int64),   # SmolLM2's heads
    (4, 1, 256, torch.int32),  # Gemma 3's
    (8, 8, 128, torch.int64),
])
def test_rotary_embedding(dtype, num_heads, num_kv_heads, head_dim, position_dtype):
    num_tokens, max_positions = 6, 4096
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    cos_sin_cache = reference.build_cos_sin_cache(inv_freq.to(DEVICE), max_positions)
    qkv = randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    query, key, value = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], -1)
    positions = torch.tensor([0, 1, 17, 999, 4095, 5], dtype=position_dtype, device=DEVICE)
    expected_q, expected_k = reference.rotary_embedding_cached(query, key, positions, cos_sin_cache)
    value_before = value.clone()
    out_q, out_k = rotary.rotary_embedding(query, key, positions, cos_sin_cache)
    assert out_q.data_ptr() == query.data_ptr() and out_k.data_ptr() == key.data_ptr()
    tol = 1e-6 if dtype == torch.float32 else ELEMENTWISE_TOL[dtype]  # float32: the same roundings, no FMA
    assert_close(query, expected_q, tol)
    assert_close(key, expected_k, tol)
    torch.testing.assert_close(value, value_before, rtol=0, atol=0)  # the third slice is not touched


# ---- KV cache write ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.float16, torch.float16),
                                               (torch.float32, torch.float16)] +
                         ([(torch.bfloat16, torch.bfloat16)] if ON_GPU else []))
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_write_kv_cache(dtype, cache_dtype, slot_dtype):
    num_tokens, num_kv_heads, head_dim, num_blocks, block_size = 9, 3, 64, 6, 16
    qkv = randn(num_tokens, 5 * num_kv_heads * head_dim, dtype=dtype).view(num_tokens, 5 * num_kv_heads, head_dim)
    key, value = qkv[:, 3 * num_kv_heads:4 * num_kv_heads], qkv[:, 4 * num_kv_heads:]  # views, row stride > KVH*D
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[2, 7]] = -1  # CUDA-graph padding rows: skipped
    slot_mapping = slots.to(slot_dtype).to(DEVICE)
    caches = (randn(2, num_blocks, block_size, num_kv_heads, head_dim) * 1e3).to(cache_dtype)
    expected = caches.clone()
    reference.write_kv_cache_split(key, value, expected[0], expected[1], slot_mapping)
    kv_cache.write_kv_cache(key, value, caches[0], caches[1], slot_mapping)
    torch.testing.assert_close(caches, expected, rtol=0, atol=0)  # a copy (and one cast): exact


# ---- paged attention: shared set-up --------------------------------------------------------------


def make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype, extra_blocks=3, seed=0):
    """Caches [num_blocks, block_size, KVH, D] of garbage with each sequence's keys written at its
    positions through a block table of random, non-contiguous block ids; padding entries of a
    table (past its sequence) are valid ids too, so a read past seq_len returns garbage."""
    generator = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    width = max(blocks_per_seq + [1]) + 1
    num_blocks = sum(blocks_per_seq) + extra_blocks
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.randint(0, num_blocks, (len(seq_lens), width), generator=generator)
    used = 0
    for s, n in enumerate(blocks_per_seq):
        tables[s, :n] = torch.tensor(order[used:used + n], dtype=torch.long)
        used += n
    key_cache = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator) * 1e3).to(dtype)
    value_cache = (torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator) * 1e3).to(dtype)
    for s, n in enumerate(seq_lens):
        positions = torch.arange(n)
        slots = tables[s, positions // block_size] * block_size + positions % block_size
        reference.write_kv_cache_split(torch.randn(n, num_kv_heads, head_dim, generator=generator),
                                       torch.randn(n, num_kv_heads, head_dim, generator=generator),
                                       key_cache, value_cache, slots)
    return key_cache.to(DEVICE), value_cache.to(DEVICE), tables.to(torch.int32).to(DEVICE)


# ---- decode attention ----------------------------------------------------------------------------

DECODE_CASES = [
    # (seq_lens, num_heads, num_kv_heads, head_dim, block_size, sliding_window, forced num_splits)
    ([1, 17, 0, 40], 4, 4, 64, 16, None, None),    # GQA 1, a padding row, default split count
    ([33, 5, 70], 8, 2, 128, 16, 20, 3),           # GQA 4, window, three shares (some empty)
    ([0, 77, 64], 8, 1, 256, 32, None, 2),         # GQA 8, head_dim 256
    ([50, 9], 16, 1, 64, 16, 9, 4),                # GQA 16, window shorter than a share
    ([700, 300], 4, 1, 64, 64, None, None),        # the default split count splits (4 "SMs" on the CPU)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens,num_heads,num_kv_heads,head_dim,block_size,window,splits", DECODE_CASES)
def test_paged_decode_attention(monkeypatch, dtype, seq_lens, num_heads, num_kv_heads, head_dim, block_size,
                                window, splits):
    if splits is not None:
        monkeypatch.setattr(decode_attention, "num_kv_splits", lambda *args: splits)
    key_cache, value_cache, tables = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    query = randn(len(seq_lens), num_heads, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    expected = reference.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens_t, scale, window,
                                                max(seq_lens))
    out = torch.full_like(query, float("nan"))
    result = decode_attention.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens_t, scale,
                                                     window, max(seq_lens), out=out)
    assert result is out
    assert_close(out, expected, ATTENTION_TOL[dtype])
    assert not out[torch.tensor(seq_lens) == 0].any()  # padding rows: zeros


def test_paged_decode_attention_merges_its_splits_launch_after_launch(monkeypatch):
    # The last share of a (sequence, kv head) to arrive merges the shares and resets its arrival
    # counter: without the reset the next launch's merge never runs (its rows stay NaN).
    monkeypatch.setattr(decode_attention, "num_kv_splits", lambda *args: 3)
    seq_lens = [70, 1, 130]
    key_cache, value_cache, tables = make_paged_kv(seq_lens, 2, 64, 16, torch.float32)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    for _ in range(3):
        query = randn(len(seq_lens), 8, 64)
        expected = reference.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens_t, 0.125, None,
                                                    max(seq_lens))
        out = torch.full_like(query, float("nan"))
        decode_attention.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens_t, 0.125, None,
                                                max(seq_lens), out=out)
        assert_close(out, expected, ATTENTION_TOL[torch.float32])


def test_num_kv_splits_fills_the_gpu_only_when_needed(monkeypatch):
    monkeypatch.setattr(decode_attention, "_sm_count", lambda device: 132)
    assert decode_attention.num_kv_splits(256, 8, 4096, DEVICE) == 1        # the batch fills the GPU
    assert decode_attention.num_kv_splits(1, 8, 1024, DEVICE) == 8          # 128 keys a share
    assert decode_attention.num_kv_splits(1, 1, 100_000, DEVICE) == 32      # capped
    assert decode_attention.num_kv_splits(16, 8, 4096, DEVICE) == 5         # about four waves
    assert decode_attention.num_kv_splits(4, 1, 100, DEVICE) == 1           # too short to split


def test_paged_decode_attention_rejects_bad_input():
    key_cache, value_cache, tables = make_paged_kv([5], 2, 64, 16, torch.float32)
    seq_lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple"):
        decode_attention.paged_decode_attention(randn(1, 3, 64), key_cache, value_cache, tables, seq_lens, 1.0)
    with pytest.raises(ValueError, match="out must be"):
        decode_attention.paged_decode_attention(randn(1, 4, 64), key_cache, value_cache, tables, seq_lens, 1.0,
                                                out=randn(1, 4, 64, dtype=torch.float16))


# ---- prefill attention ---------------------------------------------------------------------------

PREFILL_CASES = [
    # (seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, sliding_window)
    ([5, 40, 1], [5, 40, 1], 4, 4, 64, 16, None),        # whole prompts, GQA 1
    ([70, 40, 3], [20, 3, 1], 8, 2, 128, 16, None),      # chunked: queries start mid-sequence, GQA 4
    ([100, 30], [60, 30], 8, 1, 64, 32, 16),             # window, GQA 8
    ([45], [45], 4, 1, 256, 16, 24),                     # Gemma 3's shape: head_dim 256, window
    ([37, 0, 21], [12, 0, 21], 16, 2, 64, 16, 7),        # an empty sequence, GQA 8, tiny window
    ([400, 150], [300, 150], 4, 2, 64, 64, 100),         # several query tiles at the default tile sizes
]


def run_prefill(dtype, seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, window):
    key_cache, value_cache, tables = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, dtype)
    starts = [0] + [sum(query_lens[:i + 1]) for i in range(len(query_lens))]
    query = randn(starts[-1], num_heads, head_dim, dtype=dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    starts_t = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    expected = reference.paged_prefill_attention(query, key_cache, value_cache, tables, seq_lens_t, starts_t,
                                                 max(query_lens), scale, window)
    out = torch.full_like(query, float("nan"))
    result = prefill_attention.paged_prefill_attention(query, key_cache, value_cache, tables, seq_lens_t, starts_t,
                                                       max(query_lens), scale, window, out=out)
    assert result is out
    assert_close(out, expected, ATTENTION_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens,query_lens,num_heads,num_kv_heads,head_dim,block_size,window", PREFILL_CASES)
def test_paged_prefill_attention(dtype, seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size,
                                 window):
    run_prefill(dtype, seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, window)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens,query_lens,window", [
    ([150, 61], [150, 45], None),   # several query and key tiles: masked / unmasked runs, diagonal
    ([150, 90], [100, 90], 37),     # window edge, unmasked middle and diagonal in one query tile
    ([120], [120], 16),             # the window as wide as one tile
])
def test_paged_prefill_attention_small_tiles(monkeypatch, dtype, seq_lens, query_lens, window):
    """16 x 16 tiles: at test sizes, query tiles cover many key tiles, so every run of the key loop
    (window edge, unmasked middle, diagonal) is exercised with windows off the tile grid."""
    monkeypatch.setattr(prefill_attention, "_config", lambda *args: (16, 16, 4, 1))
    run_prefill(dtype, seq_lens, query_lens, 4, 2, 64, 16, window)


# ---- larger sizes, GPU only ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,max_len,window", [(64, 4096, None), (3, 3000, 512), (256, 700, None)])
def test_paged_decode_attention_large(dtype, batch, max_len, window):
    generator = torch.Generator().manual_seed(1)
    seq_lens = torch.randint(1, max_len + 1, (batch,), generator=generator).tolist()
    key_cache, value_cache, tables = make_paged_kv(seq_lens, 8, 128, 64, dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    query = randn(batch, 32, 128, dtype=dtype)
    expected = reference.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens_t, 128 ** -0.5,
                                                window, max_len)
    out = decode_attention.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens_t, 128 ** -0.5,
                                                  window, max_len)
    assert_close(out, expected, ATTENTION_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens,query_lens,head_dim,window", [
    ([2000, 700, 1300], [2000, 300, 1], 128, None),
    ([1500, 900], [1000, 900], 256, 512),
])
def test_paged_prefill_attention_large(dtype, seq_lens, query_lens, head_dim, window):
    num_heads, num_kv_heads = (32, 8) if head_dim == 128 else (4, 1)
    run_prefill(dtype, seq_lens, query_lens, num_heads, num_kv_heads, head_dim, 64, window)
