"""Rotary embedding and the KV-cache write in one launch: each token's program rotates its query
and key heads in place (rotary.rotate_token), then stores its keys and values in their cache slot,
quantizing them for an int8 / int4 cache (kv_cache.write_token_kv). A decode step ran the two as
separate launches in every layer.

The results are bit for bit those of rotary_embedding followed by write_kv_cache: the same code
runs, the rotated keys go through key's dtype (they are stored to key, then read back by the
write), and neither launch lets the compiler fuse multiply-adds.

Reference: kernels/reference.py (rotary_embedding_cached, then write_kv_cache_split).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .kv_cache import cache_write_constants, check_kv_write, scales_or_stand_ins, write_token_kv
from .rotary import check_rotary, rotary_constants, rotate_token


@triton.jit
def _rotary_write_kv_cache_kernel(query_ptr, query_row_stride, key_ptr, key_row_stride, value_ptr, value_row_stride,
                                  positions_ptr, cos_sin_ptr, cos_sin_row_stride, key_cache_ptr, value_cache_ptr,
                                  key_scales_ptr, value_scales_ptr, slot_mapping_ptr, cache_block_stride,
                                  cache_slot_stride, cache_head_stride, scales_block_stride, scales_slot_stride,
                                  scales_head_stride, num_heads, num_kv_heads, HALF: tl.constexpr,
                                  BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, BLOCK_HALF: tl.constexpr,
                                  HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_D: tl.constexpr,
                                  KV_BITS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    rotate_token(query_ptr, query_row_stride, key_ptr, key_row_stride, positions_ptr, cos_sin_ptr, cos_sin_row_stride,
                 token, num_heads, num_kv_heads, HALF, BLOCK_H, BLOCK_KVH, BLOCK_HALF)
    tl.debug_barrier()  # the rotated keys, stored by every thread, are read back by the others below
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # heads lie HEAD_DIM apart in a token's row (rotate_token's layout)
    write_token_kv(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, key_scales_ptr, value_scales_ptr, token, slot,
                   key_row_stride, HEAD_DIM, value_row_stride, HEAD_DIM, cache_block_stride, cache_slot_stride,
                   cache_head_stride, scales_block_stride, scales_slot_stride, scales_head_stride, num_kv_heads,
                   HEAD_DIM, BLOCK_SIZE, BLOCK_KVH, BLOCK_D, KV_BITS)


def rotary_write_kv_cache(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
                          cos_sin_cache: torch.Tensor, key_scales: Optional[torch.Tensor] = None,
                          value_scales: Optional[torch.Tensor] = None, kv_bits: int = 0) -> None:
    """Rotate query [T, H, D] and key [T, KVH, D] IN PLACE by positions (rotary_embedding), then
    write key and value [T, KVH, D] into the paged caches at slot_mapping (write_kv_cache; negative
    slots are skipped, kv_bits 8 / 4 quantize with key_scales / value_scales).

    query, key, value: a token's heads contiguous (head stride D, last dim contiguous), any token
    stride: views of one fused qkv output. cos_sin_cache: float32 [max_positions, D] from
    reference.build_cos_sin_cache.
    """
    num_tokens, num_heads, head_dim = query.shape
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.dim() != 3 or x.shape[2] != head_dim or x.stride(2) != 1 or x.stride(1) != head_dim:
            raise ValueError(f"rotary_write_kv_cache: {name} must be [T, heads, {head_dim}] with each token's heads "
                             f"contiguous, got {tuple(x.shape)} strides {x.stride()}")
    # [T, heads * D] views of the same rows (never copies: the rotation is in place)
    query_rows, key_rows = query.view(num_tokens, -1), key.view(num_tokens, -1)
    check_rotary("rotary_write_kv_cache", query_rows, key_rows, positions, cos_sin_cache)
    if cos_sin_cache.shape[1] != head_dim:
        raise ValueError(f"rotary_write_kv_cache: cos_sin_cache rows of {cos_sin_cache.shape[1]} values, heads of "
                         f"{head_dim}: rotary over part of a head is not supported")
    check_kv_write("rotary_write_kv_cache", key, value, key_cache, value_cache, slot_mapping, key_scales, value_scales,
                   kv_bits)
    if num_tokens == 0:
        return
    num_kv_heads = key.shape[1]
    key_scales, value_scales, scale_strides = scales_or_stand_ins(key_cache, key_scales, value_scales, kv_bits)
    rotary = rotary_constants(head_dim, num_heads, num_kv_heads)
    write = cache_write_constants(key_cache, num_kv_heads, head_dim, kv_bits)
    _rotary_write_kv_cache_kernel[(num_tokens,)](
        query, query.stride(0), key, key.stride(0), value, value.stride(0), positions, cos_sin_cache,
        cos_sin_cache.stride(0), key_cache, value_cache, key_scales, value_scales, slot_mapping,
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), *scale_strides, num_heads, num_kv_heads,
        HALF=rotary["HALF"], BLOCK_H=rotary["BLOCK_H"], BLOCK_KVH=rotary["BLOCK_KVH"], BLOCK_HALF=rotary["BLOCK_D"],
        HEAD_DIM=head_dim, BLOCK_SIZE=write["BLOCK_SIZE"], BLOCK_D=write["BLOCK_D"], KV_BITS=kv_bits,
        num_warps=4, enable_fp_fusion=False)
