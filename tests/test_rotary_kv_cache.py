"""The rotary embedding fused with the KV-cache write (kernels/rotary_kv_cache.py) against the two
launches it replaces, rotary_embedding then write_kv_cache (each tested against the torch reference
in test_kernels.py and test_kv_quant_kernels.py): the same bits in q, k, v, the caches and their
scales, unquantized and int8 / int4. Without a GPU it runs under Triton's interpreter."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from test_kernels import DEVICE, DTYPES, randn  # noqa: E402
from tidemind.kernels import kv_cache, reference, rotary  # noqa: E402
from tidemind.kernels.rotary_kv_cache import rotary_write_kv_cache  # noqa: E402

NUM_TOKENS, NUM_BLOCKS, MAX_POSITIONS = 7, 4, 2048
POSITIONS = [0, 1, 17, 999, 2047, 5, 300]


def _rope_table(head_dim: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    return reference.build_cos_sin_cache(inv_freq.to(DEVICE), MAX_POSITIONS)


def _caches(bits: int, dtype: torch.dtype, block_size: int, num_kv_heads: int, head_dim: int):
    """(caches [2, blocks, block_size, KVH, W], scales [2, ..., 2] or None) holding garbage."""
    shape = (2, NUM_BLOCKS, block_size, num_kv_heads)
    if not bits:
        return (randn(*shape, head_dim) * 1e3).to(dtype), None
    data = torch.randint(0, 256, (*shape, head_dim * bits // 8), dtype=torch.uint8).to(DEVICE)
    return data, (randn(*shape, 2) * 1e3).to(torch.float16)


@pytest.mark.parametrize("bits", (0, 8, 4))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,block_size", [
    (9, 3, 64, 16),   # SmolLM2's heads, GQA 3
    (4, 1, 256, 32),  # Gemma 3's
    (8, 2, 128, 16),
    (8, 8, 32, 16),   # no GQA
])
def test_rotary_write_kv_cache_is_rotary_then_write(bits, dtype, num_heads, num_kv_heads, head_dim, block_size):
    table = _rope_table(head_dim)
    positions = torch.tensor(POSITIONS, dtype=torch.int64, device=DEVICE)
    slots = torch.randperm(NUM_BLOCKS * block_size)[:NUM_TOKENS]
    slots[[2, 5]] = -1  # CUDA-graph padding rows: rotated, not written
    slot_mapping = slots.to(torch.int32).to(DEVICE)
    qkv = randn(NUM_TOKENS, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype)  # one fused qkv output
    qkv[:, -num_kv_heads:] += 20.0  # values far from 0: an asymmetric range when quantized
    caches, scales = _caches(bits, dtype, block_size, num_kv_heads, head_dim)

    def run(fused: bool):
        rows, cache = qkv.clone(), caches.clone()
        cache_scales = scales.clone() if bits else None
        quant = dict(key_scales=cache_scales[0], value_scales=cache_scales[1], kv_bits=bits) if bits else {}
        query, key, value = rows.split([num_heads, num_kv_heads, num_kv_heads], dim=1)  # strided views
        if fused:
            rotary_write_kv_cache(query, key, value, cache[0], cache[1], slot_mapping, positions, table, **quant)
        else:
            rotary.rotary_embedding(query.view(NUM_TOKENS, -1), key.view(NUM_TOKENS, -1), positions, table)
            kv_cache.write_kv_cache(key, value, cache[0], cache[1], slot_mapping, **quant)
        return rows, cache, cache_scales

    fused, separate = run(True), run(False)
    for got, want in zip(fused, separate):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(fused[0], qkv)  # q and k were rotated in place (the test would pass vacuously)
    if bits == 0:  # the written rows are the rotated keys and the values
        rows, cache = fused[0], fused[1]
        written = slot_mapping.long() >= 0
        flat_keys = cache[0].view(-1, num_kv_heads, head_dim)[slot_mapping.long()[written]]
        torch.testing.assert_close(flat_keys, rows[written, num_heads:num_heads + num_kv_heads].to(cache.dtype),
                                   rtol=0, atol=0)


def test_rotary_write_kv_cache_rejects_bad_input():
    table = _rope_table(64)
    positions = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    slots = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    caches, _ = _caches(0, torch.float32, 16, 2, 64)
    query = randn(3, 4, 64)
    key, value = randn(3, 2, 64), randn(3, 2, 64)
    with pytest.raises(ValueError, match="rotary_write_kv_cache: query .* heads contiguous"):
        rotary_write_kv_cache(randn(4, 3, 64).transpose(0, 1), key, value, caches[0], caches[1], slots, positions,
                              table)
    with pytest.raises(ValueError, match="rotary_write_kv_cache: cos_sin_cache rows of 32"):
        rotary_write_kv_cache(query, key, value, caches[0], caches[1], slots, positions, _rope_table(32))
    with pytest.raises(ValueError, match="rotary_write_kv_cache: positions"):
        rotary_write_kv_cache(query, key, value, caches[0], caches[1], slots, positions[:2], table)
    with pytest.raises(ValueError, match="rotary_write_kv_cache: key must be"):
        rotary_write_kv_cache(query, randn(3, 3, 64), randn(3, 3, 64), caches[0], caches[1], slots, positions, table)
