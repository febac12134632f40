"""Store the step's new keys and values in their paged-cache slots, one program per token; with
kv_bits 8 / 4, quantize them on the way (the layout is described in attention/kv_cache.py). A
token's program is write_token_kv, which rotary_kv_cache.py runs after its rotation.

Also the cache format's shared pieces: load_kv_tile, the @triton.jit helper through which the decode
and prefill kernels read (and dequantize) K and V tiles, and check_kv_cache, their launchers' checks
of the caches.

Reference: kernels/reference.py (write_kv_cache_split, quantize_kv, dequantize_kv).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .int_to_float import small_int_to_float
from .reference import FLOAT16_MAX, FLOAT16_TINY, KV_MARGIN_HIGH, KV_MARGIN_LOW

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KV_BITS = (0, 8, 4)


# (scale, zero) rounding constants of reference.kv_scale_zero, as the kernels see them
_MARGIN_HIGH = tl.constexpr(KV_MARGIN_HIGH)
_MARGIN_LOW = tl.constexpr(KV_MARGIN_LOW)
_F16_MAX = tl.constexpr(FLOAT16_MAX)
_F16_TINY = tl.constexpr(FLOAT16_TINY)


@triton.jit
def _kv_scale_zero(lo, hi, QMAX: tl.constexpr):
    # reference.kv_scale_zero, operation for operation: lo, hi [R] float32 -> (scale, zero) [R] float32
    # holding float16 values, zero <= lo and zero + QMAX * scale >= hi
    zero = lo - tl.abs(lo) * _MARGIN_HIGH - tl.abs(lo) * _MARGIN_LOW - _F16_TINY
    zero = tl.minimum(tl.maximum(zero, -_F16_MAX), _F16_MAX).to(tl.float16).to(tl.float32)
    scale = (hi - zero) * ((1 + _MARGIN_HIGH + _MARGIN_LOW) / QMAX) + _F16_TINY
    scale = tl.minimum(scale, _F16_MAX).to(tl.float16).to(tl.float32)
    return scale, zero


@triton.jit
def _quantize(x, scale, zero, QMAX: tl.constexpr):
    # x [R, C] float32, scale / zero [R] -> [R, C] int32 in [0, QMAX]; an IEEE division, as torch's
    shifted, scale = tl.broadcast(x - zero[:, None], scale[:, None])
    q = tl.floor(tl.div_rn(shifted, scale) + 0.5)
    return tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.int32)


@triton.jit
def _quantize_store(src, dst, dst_scales, row_mask, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    KV_BITS: tl.constexpr):
    # Quantize R rows of HEAD_DIM values; store their bytes and their (scale, zero).
    # src / dst / dst_scales: [R] pointers to each row's first value / byte / scale; row_mask [R].
    # A stored row is WIDTH bytes: the row (int8), or its halves' nibbles (int4: low nibble from the
    # first half, high nibble from the second); BLOCK_D = next power of two >= WIDTH.
    QMAX: tl.constexpr = 2 ** KV_BITS - 1
    WIDTH: tl.constexpr = HEAD_DIM * KV_BITS // 8
    cols = tl.arange(0, BLOCK_D)
    mask = row_mask[:, None] & (cols < WIDTH)[None, :]  # [R, BLOCK_D]
    first = tl.load(src[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(mask, first, float("inf")), axis=1)
    hi = tl.max(tl.where(mask, first, float("-inf")), axis=1)
    if KV_BITS == 4:
        second = tl.load(src[:, None] + WIDTH + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        lo = tl.minimum(lo, tl.min(tl.where(mask, second, float("inf")), axis=1))
        hi = tl.maximum(hi, tl.max(tl.where(mask, second, float("-inf")), axis=1))
    lo = tl.where(row_mask, lo, 0.0)  # rows not written: finite stand-ins
    hi = tl.where(row_mask, hi, 0.0)
    scale, zero = _kv_scale_zero(lo, hi, QMAX)
    q = _quantize(first, scale, zero, QMAX)
    if KV_BITS == 4:
        q = q | (_quantize(second, scale, zero, QMAX) << 4)
    tl.store(dst[:, None] + cols[None, :], q.to(tl.uint8), mask=mask)
    tl.store(dst_scales, scale.to(tl.float16), mask=row_mask)
    tl.store(dst_scales + 1, zero.to(tl.float16), mask=row_mask)


@triton.jit
def write_token_kv(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, key_scales_ptr, value_scales_ptr, token, slot,
                   key_token_stride, key_head_stride, value_token_stride, value_head_stride, cache_block_stride,
                   cache_slot_stride, cache_head_stride, scales_block_stride, scales_slot_stride, scales_head_stride,
                   num_kv_heads, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
                   BLOCK_D: tl.constexpr, KV_BITS: tl.constexpr):
    """One token's keys and values, every KV head, into cache slot `slot` (block_id * BLOCK_SIZE +
    offset; < 0: nothing is written), quantized when KV_BITS is 8 / 4 (each row's (scale, zero) then
    written to key_scales_ptr / value_scales_ptr). BLOCK_D: next power of two >= a cache row's width."""
    heads = tl.arange(0, BLOCK_H)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    if KV_BITS == 0:
        dims = tl.arange(0, BLOCK_D)
        mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_DIM)[None, :] & (slot >= 0)  # [BLOCK_H, BLOCK_D]
        key = tl.load(key_ptr + token * key_token_stride + heads[:, None] * key_head_stride + dims[None, :],
                      mask=mask)
        value = tl.load(value_ptr + token * value_token_stride + heads[:, None] * value_head_stride + dims[None, :],
                        mask=mask)
        cache_offsets = (block * cache_block_stride + offset * cache_slot_stride + heads[:, None] * cache_head_stride
                         + dims[None, :])
        tl.store(key_cache_ptr + cache_offsets, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(value_cache_ptr + cache_offsets, value.to(value_cache_ptr.dtype.element_ty), mask=mask)
    else:
        row_mask = (heads < num_kv_heads) & (slot >= 0)  # [BLOCK_H]: one row per KV head
        cache_rows = block * cache_block_stride + offset * cache_slot_stride + heads * cache_head_stride
        scale_rows = block * scales_block_stride + offset * scales_slot_stride + heads * scales_head_stride
        _quantize_store(key_ptr + token * key_token_stride + heads * key_head_stride, key_cache_ptr + cache_rows,
                        key_scales_ptr + scale_rows, row_mask, HEAD_DIM, BLOCK_D, KV_BITS)
        _quantize_store(value_ptr + token * value_token_stride + heads * value_head_stride,
                        value_cache_ptr + cache_rows, value_scales_ptr + scale_rows, row_mask, HEAD_DIM, BLOCK_D,
                        KV_BITS)


@triton.jit
def _write_kv_cache_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, key_scales_ptr, value_scales_ptr,
                           slot_mapping_ptr, key_token_stride, key_head_stride, value_token_stride, value_head_stride,
                           cache_block_stride, cache_slot_stride, cache_head_stride, scales_block_stride,
                           scales_slot_stride, scales_head_stride, num_kv_heads, HEAD_DIM: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
                           KV_BITS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    write_token_kv(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, key_scales_ptr, value_scales_ptr, token, slot,
                   key_token_stride, key_head_stride, value_token_stride, value_head_stride, cache_block_stride,
                   cache_slot_stride, cache_head_stride, scales_block_stride, scales_slot_stride, scales_head_stride,
                   num_kv_heads, HEAD_DIM, BLOCK_SIZE, BLOCK_H, BLOCK_D, KV_BITS)


@triton.jit
def load_kv_tile(cache_ptr, scales_ptr, rows, scale_rows, row_mask, HEAD_DIM: tl.constexpr, KV_BITS: tl.constexpr,
                 MASKED: tl.constexpr):
    """Keys or values of N cached tokens of one KV head: [N, HEAD_DIM] in the cache dtype (KV_BITS
    0), or dequantized to float32 (8 / 4). rows, scale_rows: [N] offsets of each token's row in
    cache_ptr and of its (scale, zero) in scales_ptr; with MASKED, rows where row_mask [N] is false
    read as zeros (their offsets need not be valid)."""
    dims = tl.arange(0, HEAD_DIM)
    if KV_BITS == 4:
        columns = dims % (HEAD_DIM // 2)  # elements d and d + HEAD_DIM / 2 share byte d
    else:
        columns = dims
    if MASKED:
        x = tl.load(cache_ptr + rows[:, None] + columns[None, :], mask=row_mask[:, None], other=0.0)
    else:
        x = tl.load(cache_ptr + rows[:, None] + columns[None, :])
    if KV_BITS != 0:
        if MASKED:
            scale = tl.load(scales_ptr + scale_rows, mask=row_mask, other=0.0).to(tl.float32)
            zero = tl.load(scales_ptr + scale_rows + 1, mask=row_mask, other=0.0).to(tl.float32)
        else:
            scale = tl.load(scales_ptr + scale_rows).to(tl.float32)
            zero = tl.load(scales_ptr + scale_rows + 1).to(tl.float32)
        q = x.to(tl.int32)
        if KV_BITS == 4:
            q = (q >> ((dims // (HEAD_DIM // 2)) * 4)[None, :]) & 15
        x = small_int_to_float(q) * scale[:, None] + zero[:, None]
    return x


def check_kv_cache(fn: str, key_cache: torch.Tensor, value_cache: torch.Tensor, head_dim: int,
                   key_scales: Optional[torch.Tensor], value_scales: Optional[torch.Tensor], kv_bits: int) -> None:
    """Raise ValueError, naming fn, unless the caches are contiguous [num_blocks, block_size, KVH, W]:
    of a model dtype with W = head_dim (kv_bits 0), or uint8 with W = head_dim * kv_bits / 8 and
    float16 (scale, zero) pairs key_scales / value_scales [num_blocks, block_size, KVH, 2] (8 / 4)."""
    if kv_bits not in KV_BITS:
        raise ValueError(f"{fn}: kv_bits={kv_bits!r} is not one of {KV_BITS}")
    if kv_bits == 4 and head_dim % 2:
        raise ValueError(f"{fn}: int4 KV packs two values a byte along head_dim; head_dim {head_dim} is odd")
    width = head_dim * kv_bits // 8 if kv_bits else head_dim
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape or key_cache.shape[3] != width:
        raise ValueError(f"{fn}: key_cache {tuple(key_cache.shape)} and value_cache {tuple(value_cache.shape)} must "
                         f"be [num_blocks, block_size, KVH, {width}] (head_dim {head_dim}, kv_bits {kv_bits})")
    dtypes = (torch.uint8,) if kv_bits else _DTYPES
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()) or key_cache.dtype not in dtypes \
            or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"{fn}: caches must be contiguous, of one dtype in {dtypes} (kv_bits {kv_bits}), got "
                         f"{key_cache.dtype} and {value_cache.dtype}")
    if not kv_bits:
        if key_scales is not None or value_scales is not None:
            raise ValueError(f"{fn}: key_scales / value_scales are given with kv_bits 0; pass kv_bits 8 or 4")
        return
    expected = (*key_cache.shape[:3], 2)
    for name, scales in (("key_scales", key_scales), ("value_scales", value_scales)):
        if scales is None or tuple(scales.shape) != expected or scales.dtype != torch.float16 \
                or not scales.is_contiguous() or scales.device != key_cache.device:
            raise ValueError(f"{fn}: {name} must be contiguous float16 {list(expected)} on {key_cache.device} with "
                             f"kv_bits {kv_bits}")


def check_kv_write(fn: str, key, value, key_cache, value_cache, slot_mapping, key_scales, value_scales,
                   kv_bits) -> None:
    if key.dim() != 3:
        raise ValueError(f"{fn}: key must be [T, num_kv_heads, head_dim], got {tuple(key.shape)}")
    head_dim = key.shape[2]
    check_kv_cache(fn, key_cache, value_cache, head_dim, key_scales, value_scales, kv_bits)
    block_size = key_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"{fn}: block_size {block_size} must be a power of two")
    expected = (slot_mapping.shape[0], key_cache.shape[2], head_dim)
    for name, x in (("key", key), ("value", value)):
        if tuple(x.shape) != expected or x.stride(2) != 1:
            raise ValueError(f"{fn}: {name} must be {list(expected)} [T, num_kv_heads, head_dim] with a "
                             f"contiguous last dim, got {tuple(x.shape)} strides {x.stride()}")
        if x.dtype not in _DTYPES or x.device != key_cache.device:
            raise ValueError(f"{fn}: {name} is {x.dtype} on {x.device}; want one of {_DTYPES} on "
                             f"{key_cache.device}")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{fn}: slot_mapping must be [T] int32 / int64, got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if slot_mapping.device != key_cache.device:
        raise ValueError(f"{fn}: slot_mapping is on {slot_mapping.device}, the cache on {key_cache.device}")


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, key_scales: Optional[torch.Tensor] = None,
                   value_scales: Optional[torch.Tensor] = None, kv_bits: int = 0) -> None:
    """key_cache / value_cache [num_blocks, block_size, KVH, D] at flat slot slot_mapping[t]
    (block_id * block_size + offset) <- key[t] / value[t] cast to the cache dtype; tokens with a
    negative slot are skipped (padding rows of CUDA-graph batches use -1).

    kv_bits 8 / 4: the caches are uint8 [..., D * kv_bits / 8] and each (token, head) row is
    quantized as reference.quantize_kv does, its (scale, zero) stored in key_scales / value_scales
    [num_blocks, block_size, KVH, 2] float16 at the same slot.

    key, value: [T, KVH, D], last dim contiguous, any token / head strides (views into a fused qkv
    output); slot_mapping: [T] int32 / int64, each slot < num_blocks * block_size (not checked).
    """
    check_kv_write("write_kv_cache", key, value, key_cache, value_cache, slot_mapping, key_scales, value_scales,
                   kv_bits)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    key_scales, value_scales, scale_strides = scales_or_stand_ins(key_cache, key_scales, value_scales, kv_bits)
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, key_scales, value_scales, slot_mapping, key.stride(0), key.stride(1),
        value.stride(0), value.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        *scale_strides, num_kv_heads, **cache_write_constants(key_cache, num_kv_heads, head_dim, kv_bits),
        num_warps=4, enable_fp_fusion=False)  # (scale, zero) round as the reference's, and as rotary_kv_cache's


def scales_or_stand_ins(key_cache: torch.Tensor, key_scales: Optional[torch.Tensor],
                        value_scales: Optional[torch.Tensor], kv_bits: int):
    """(key_scales, value_scales, their [block, slot, head] strides) as the kernels' arguments; an
    unquantized cache (kv_bits 0) passes the cache itself and zero strides (never read)."""
    if not kv_bits:
        return key_cache, key_cache, (0, 0, 0)
    return key_scales, value_scales, key_scales.stride()[:3]


def cache_write_constants(key_cache: torch.Tensor, num_kv_heads: int, head_dim: int, kv_bits: int) -> dict:
    """write_token_kv's compile-time arguments for this cache."""
    return dict(HEAD_DIM=head_dim, BLOCK_SIZE=key_cache.shape[1], BLOCK_H=triton.next_power_of_2(num_kv_heads),
                BLOCK_D=triton.next_power_of_2(key_cache.shape[3]), KV_BITS=kv_bits)
