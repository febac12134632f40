"""The Triton kernels on a quantized KV cache (quant_policy 8 / 4) against the quantize-then-reference
path: the KV write kernel against reference.write_kv_cache_split, the decode and prefill kernels
against the unquantized torch reference run on the whole cache dequantized (reference.dequantize_kv).

Set-up and tolerances as in test_kernels.py (whose cases are reused: GQA 1 to 16, head_dim 64 /
128 / 256, sliding windows, padding rows, chunked prefill): the kernels and the reference see the
same dequantized values (q * scale + zero in float32, then the query's dtype), so the attention
tolerances are the unquantized ones. Caches start as large finite garbage quantized (or random
bytes and scales for the write test), so a slot read without being written shows up.

The write kernel makes the reference's float32 operations in the same order with an IEEE division:
under the interpreter its bytes and scales are those of the reference, bit for bit. A GPU may fuse a
multiply-add in the scale (a last-bit difference before float16 rounding), so there the bytes may
differ by one step where a value sits on a rounding boundary: the dequantized values are compared
within one step.
"""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from test_kernels import (ATTENTION_TOL, DECODE_CASES, DEVICE, DTYPES, ON_GPU, PREFILL_CASES,  # noqa: E402
                          assert_close, make_paged_kv, randn)
from tidemind.kernels import decode_attention, kv_cache, prefill_attention, reference  # noqa: E402

BITS = (8, 4)


def quantize_cache(cache: torch.Tensor, bits: int):
    """(uint8 cache, float16 scales [num_blocks, block_size, KVH, 2]) of every row of cache."""
    return reference.quantize_kv(cache, bits)


def dequantized(cache: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    return reference.dequantize_kv(cache, scales, bits, dtype)


# ---- KV write ------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_kv_heads,head_dim,block_size", [(3, 64, 16), (1, 256, 64), (8, 128, 16), (2, 80, 32)])
def test_write_kv_cache_quantized(bits, dtype, num_kv_heads, head_dim, block_size):
    num_tokens, num_blocks = 11, 5
    qkv = randn(num_tokens, 5 * num_kv_heads, head_dim, dtype=torch.float32)
    qkv[:, 4 * num_kv_heads:] += 20.0  # values far from 0: an asymmetric range
    qkv[0, 3 * num_kv_heads] = 0.5  # a constant row
    qkv = qkv.to(dtype)
    key, value = qkv[:, 3 * num_kv_heads:4 * num_kv_heads], qkv[:, 4 * num_kv_heads:]  # strided views
    slots = torch.randperm(num_blocks * block_size)[:num_tokens]
    slots[[1, 6]] = -1  # CUDA-graph padding rows: skipped
    slot_mapping = slots.to(torch.int32).to(DEVICE)
    width = head_dim * bits // 8
    data = torch.randint(0, 256, (2, num_blocks, block_size, num_kv_heads, width), dtype=torch.uint8).to(DEVICE)
    scales = (torch.randn(2, num_blocks, block_size, num_kv_heads, 2) * 1e3).to(torch.float16).to(DEVICE)
    expected_data, expected_scales = data.clone(), scales.clone()
    reference.write_kv_cache_split(key, value, expected_data[0], expected_data[1], slot_mapping, expected_scales[0],
                                   expected_scales[1], bits)
    kv_cache.write_kv_cache(key, value, data[0], data[1], slot_mapping, scales[0], scales[1], bits)
    if not ON_GPU:
        torch.testing.assert_close(data, expected_data, rtol=0, atol=0)
        torch.testing.assert_close(scales, expected_scales, rtol=0, atol=0)
        return
    step = expected_scales[..., 0:1].float()
    torch.testing.assert_close(scales.float(), expected_scales.float(), rtol=1e-3, atol=0)  # one float16 ulp
    error = (dequantized(data, scales, bits, torch.float32) - dequantized(expected_data, expected_scales, bits,
                                                                          torch.float32)).abs()
    assert (error <= step * 1.01).all()
    assert (data != expected_data).float().mean() < 1e-3


def test_write_kv_cache_quantized_rejects_bad_input():
    key = randn(2, 1, 5)
    data = torch.zeros(2, 4, 16, 1, 2, dtype=torch.uint8, device=DEVICE)
    scales = torch.zeros(2, 4, 16, 1, 2, dtype=torch.float16, device=DEVICE)
    slots = torch.tensor([0, 1], device=DEVICE)
    with pytest.raises(ValueError, match="head_dim 5 is odd"):
        kv_cache.write_kv_cache(key, key, data[0], data[1], slots, scales[0], scales[1], 4)
    key = randn(2, 1, 4)
    with pytest.raises(ValueError, match="key_scales must be contiguous float16"):
        kv_cache.write_kv_cache(key, key, data[0], data[1], slots, scales[0].float(), scales[1], 4)
    with pytest.raises(ValueError, match=r"must be \[num_blocks, block_size, KVH, 4\]"):
        kv_cache.write_kv_cache(key, key, data[0], data[1], slots, scales[0], scales[1], 8)
    float_cache = torch.zeros(2, 4, 16, 1, 4, device=DEVICE)
    with pytest.raises(ValueError, match="given with kv_bits 0"):
        kv_cache.write_kv_cache(key, key, float_cache[0], float_cache[1], slots, scales[0], scales[1], 0)


# ---- decode and prefill attention ----------------------------------------------------------------


def quantized_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, bits):
    """make_paged_kv's garbage-filled caches and block tables, every row quantized."""
    key_cache, value_cache, tables = make_paged_kv(seq_lens, num_kv_heads, head_dim, block_size, torch.float32)
    key_cache, key_scales = quantize_cache(key_cache, bits)
    value_cache, value_scales = quantize_cache(value_cache, bits)
    return key_cache, value_cache, key_scales, value_scales, tables


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens,num_heads,num_kv_heads,head_dim,block_size,window,splits", DECODE_CASES)
def test_paged_decode_attention_quantized(monkeypatch, bits, dtype, seq_lens, num_heads, num_kv_heads, head_dim,
                                          block_size, window, splits):
    if splits is not None:
        monkeypatch.setattr(decode_attention, "num_kv_splits", lambda *args: splits)
    key_cache, value_cache, key_scales, value_scales, tables = quantized_paged_kv(seq_lens, num_kv_heads, head_dim,
                                                                                 block_size, bits)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    query = randn(len(seq_lens), num_heads, head_dim, dtype=dtype)
    scale = head_dim ** -0.5
    expected = reference.paged_decode_attention(query, dequantized(key_cache, key_scales, bits, dtype),
                                                dequantized(value_cache, value_scales, bits, dtype), tables,
                                                seq_lens_t, scale, window, max(seq_lens))
    quant = dict(key_scales=key_scales, value_scales=value_scales, kv_bits=bits)
    # the reference's own quantized path (the CPU backend's) dequantizes what it gathers: the same values
    assert_close(reference.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens_t, scale, window,
                                                  max(seq_lens), **quant), expected, 1e-6)
    out = torch.full_like(query, float("nan"))
    decode_attention.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens_t, scale, window,
                                            max(seq_lens), out=out, **quant)
    assert_close(out, expected, ATTENTION_TOL[dtype])
    assert not out[torch.tensor(seq_lens) == 0].any()  # padding rows: zeros


def run_prefill_quantized(bits, dtype, seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, window):
    key_cache, value_cache, key_scales, value_scales, tables = quantized_paged_kv(seq_lens, num_kv_heads, head_dim,
                                                                                 block_size, bits)
    starts = [0] + [sum(query_lens[:i + 1]) for i in range(len(query_lens))]
    query = randn(starts[-1], num_heads, head_dim, dtype=dtype)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    starts_t = torch.tensor(starts, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    expected = reference.paged_prefill_attention(query, dequantized(key_cache, key_scales, bits, dtype),
                                                 dequantized(value_cache, value_scales, bits, dtype), tables,
                                                 seq_lens_t, starts_t, max(query_lens), scale, window)
    quant = dict(key_scales=key_scales, value_scales=value_scales, kv_bits=bits)
    assert_close(reference.paged_prefill_attention(query, key_cache, value_cache, tables, seq_lens_t, starts_t,
                                                   max(query_lens), scale, window, **quant), expected, 1e-6)
    out = torch.full_like(query, float("nan"))
    prefill_attention.paged_prefill_attention(query, key_cache, value_cache, tables, seq_lens_t, starts_t,
                                              max(query_lens), scale, window, out=out, **quant)
    assert_close(out, expected, ATTENTION_TOL[dtype])


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens,query_lens,num_heads,num_kv_heads,head_dim,block_size,window", PREFILL_CASES)
def test_paged_prefill_attention_quantized(bits, dtype, seq_lens, query_lens, num_heads, num_kv_heads, head_dim,
                                           block_size, window):
    run_prefill_quantized(bits, dtype, seq_lens, query_lens, num_heads, num_kv_heads, head_dim, block_size, window)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("seq_lens,query_lens,window", [([150, 61], [150, 45], None), ([150, 90], [100, 90], 37)])
def test_paged_prefill_attention_quantized_small_tiles(monkeypatch, bits, seq_lens, query_lens, window):
    """16 x 16 tiles: the masked and unmasked key runs (both load paths of load_kv_tile)."""
    monkeypatch.setattr(prefill_attention, "_config", lambda *args: (16, 16, 4, 1))
    run_prefill_quantized(bits, torch.float32, seq_lens, query_lens, 4, 2, 64, 16, window)


def test_attention_rejects_bad_quantized_input():
    key_cache, value_cache, key_scales, value_scales, tables = quantized_paged_kv([5], 2, 64, 16, 4)
    seq_lens = torch.tensor([5], dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="value_scales must be contiguous float16"):
        decode_attention.paged_decode_attention(randn(1, 4, 64), key_cache, value_cache, tables, seq_lens, 1.0,
                                                key_scales=key_scales, kv_bits=4)
    with pytest.raises(ValueError, match=r"must be \[num_blocks, block_size, KVH, 64\]"):
        prefill_attention.paged_prefill_attention(randn(5, 4, 64), key_cache, value_cache, tables, seq_lens,
                                                  torch.tensor([0, 5], device=DEVICE), 5, 1.0, key_scales=key_scales,
                                                  value_scales=value_scales, kv_bits=8)


# ---- larger sizes, GPU only ------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,max_len,head_dim,window", [(64, 4096, 128, None), (3, 3000, 256, 512),
                                                          (256, 700, 128, None)])
def test_paged_decode_attention_quantized_large(bits, dtype, batch, max_len, head_dim, window):
    generator = torch.Generator().manual_seed(1)
    seq_lens = torch.randint(1, max_len + 1, (batch,), generator=generator).tolist()
    num_heads, num_kv_heads = (32, 8) if head_dim == 128 else (4, 1)
    key_cache, value_cache, key_scales, value_scales, tables = quantized_paged_kv(seq_lens, num_kv_heads, head_dim,
                                                                                 64, bits)
    seq_lens_t = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    query = randn(batch, num_heads, head_dim, dtype=dtype)
    expected = reference.paged_decode_attention(query, dequantized(key_cache, key_scales, bits, dtype),
                                                dequantized(value_cache, value_scales, bits, dtype), tables,
                                                seq_lens_t, head_dim ** -0.5, window, max_len)
    out = decode_attention.paged_decode_attention(query, key_cache, value_cache, tables, seq_lens_t, head_dim ** -0.5,
                                                  window, max_len, key_scales=key_scales, value_scales=value_scales,
                                                  kv_bits=bits)
    assert_close(out, expected, ATTENTION_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens,query_lens,head_dim,window", [
    ([2000, 700, 1300], [2000, 300, 1], 128, None),
    ([1500, 900], [1000, 900], 256, 512),
])
def test_paged_prefill_attention_quantized_large(bits, dtype, seq_lens, query_lens, head_dim, window):
    num_heads, num_kv_heads = (32, 8) if head_dim == 128 else (4, 1)
    run_prefill_quantized(bits, dtype, seq_lens, query_lens, num_heads, num_kv_heads, head_dim, 64, window)
