"""Rotary position embedding of query and key in place, "rotate half" (GPT-NeoX / HF) layout,
with cos / sin read from a per-position table built once (reference.build_cos_sin_cache).

For head h with halves x1 = x[:D/2], x2 = x[D/2:] and the angles of the token's position:
    out1 = x1 * cos - x2 * sin        out2 = x2 * cos + x1 * sin
which is Hugging Face's x * cos + rotate_half(x) * sin written per half.

Reference: kernels/reference.py (rotary_embedding_cached). The kernel computes in float32 with
fused multiply-adds switched off, so in float32 it rounds exactly where the reference (and
transformers) round; in bfloat16 / float16 the reference rounds cos, sin and every product to that
dtype, the kernel only the result.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _rotate_heads(row_ptr, num_heads, cos, sin, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # row_ptr: one token's [num_heads * 2 * HALF] values; cos, sin: [BLOCK_D] float32
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_heads)[:, None] & (dims < HALF)[None, :]
    ptrs = row_ptr + heads[:, None] * (2 * HALF) + dims[None, :]  # [BLOCK_H, BLOCK_D], first halves
    x1 = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(ptrs, out1.to(row_ptr.dtype.element_ty), mask=mask)
    tl.store(ptrs + HALF, out2.to(row_ptr.dtype.element_ty), mask=mask)


@triton.jit
def rotate_token(query_ptr, query_row_stride, key_ptr, key_row_stride, positions_ptr, cos_sin_ptr, cos_sin_row_stride,
                 token, num_heads, num_kv_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    """Rotate one token's query and key heads in place by its position (positions_ptr[token])."""
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    row = cos_sin_ptr + position * cos_sin_row_stride  # [cos (HALF) | sin (HALF)], float32
    cos = tl.load(row + dims, mask=dims < HALF, other=0.0)
    sin = tl.load(row + HALF + dims, mask=dims < HALF, other=0.0)
    _rotate_heads(query_ptr + token * query_row_stride, num_heads, cos, sin, HALF, BLOCK_H, BLOCK_D)
    _rotate_heads(key_ptr + token * key_row_stride, num_kv_heads, cos, sin, HALF, BLOCK_KVH, BLOCK_D)


@triton.jit
def _rotary_embedding_kernel(query_ptr, query_row_stride, key_ptr, key_row_stride, positions_ptr, cos_sin_ptr,
                             cos_sin_row_stride, num_heads, num_kv_heads, HALF: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, BLOCK_D: tl.constexpr):
    rotate_token(query_ptr, query_row_stride, key_ptr, key_row_stride, positions_ptr, cos_sin_ptr, cos_sin_row_stride,
                 tl.program_id(0).to(tl.int64), num_heads, num_kv_heads, HALF, BLOCK_H, BLOCK_KVH, BLOCK_D)


def check_rotary(fn: str, query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> None:
    if cos_sin_cache.dim() != 2 or cos_sin_cache.shape[1] % 2 or cos_sin_cache.dtype != torch.float32:
        raise ValueError(f"{fn}: cos_sin_cache must be float32 [max_positions, head_dim], got "
                         f"{cos_sin_cache.dtype} {tuple(cos_sin_cache.shape)}")
    if cos_sin_cache.stride(1) != 1:
        raise ValueError(f"{fn}: cos_sin_cache's last dim must be contiguous")
    head_dim = cos_sin_cache.shape[1]
    for name, x in (("query", query), ("key", key)):
        if x.dim() != 2 or x.shape[1] % head_dim:
            raise ValueError(f"{fn}: {name} must be [num_tokens, heads * {head_dim}], got "
                             f"{tuple(x.shape)}")
        if x.stride(1) != 1:
            raise ValueError(f"{fn}: {name}'s last dim must be contiguous, got strides {x.stride()}")
        if x.dtype not in _DTYPES:
            raise ValueError(f"{fn}: {name} dtype {x.dtype} is not one of {_DTYPES}")
        if x.device != cos_sin_cache.device:
            raise ValueError(f"{fn}: {name} is on {x.device}, cos_sin_cache on {cos_sin_cache.device}")
    if positions.shape != (query.shape[0],) or key.shape[0] != query.shape[0]:
        raise ValueError(f"{fn}: positions {tuple(positions.shape)}, query {tuple(query.shape)} and "
                         f"key {tuple(key.shape)} must have the same number of tokens")
    if positions.dtype not in (torch.int32, torch.int64) or positions.device != query.device:
        raise ValueError(f"{fn}: positions must be int32 / int64 on {query.device}, got "
                         f"{positions.dtype} on {positions.device}")


def rotary_embedding(query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rotate query [T, H * D] and key [T, KVH * D] IN PLACE by their tokens' positions; returns them.

    query and key may be column slices of one fused qkv output (row stride > width); last dim
    contiguous. positions: [T] int32 / int64, each < max_positions (not checked: no host reads);
    cos_sin_cache: float32 [max_positions, D] from reference.build_cos_sin_cache.
    """
    check_rotary("rotary_embedding", query, key, positions, cos_sin_cache)
    num_tokens = query.shape[0]
    if num_tokens == 0:
        return query, key
    head_dim = cos_sin_cache.shape[1]
    num_heads, num_kv_heads = query.shape[1] // head_dim, key.shape[1] // head_dim
    _rotary_embedding_kernel[(num_tokens,)](
        query, query.stride(0), key, key.stride(0), positions, cos_sin_cache, cos_sin_cache.stride(0),
        num_heads, num_kv_heads, **rotary_constants(head_dim, num_heads, num_kv_heads), num_warps=4,
        enable_fp_fusion=False)
    return query, key


def rotary_constants(head_dim: int, num_heads: int, num_kv_heads: int) -> dict:
    """rotate_token's compile-time arguments. Its launches pass enable_fp_fusion=False: no fused
    multiply-adds, so float32 rounds where the reference does."""
    half = head_dim // 2
    return dict(HALF=half, BLOCK_H=triton.next_power_of_2(num_heads), BLOCK_KVH=triton.next_power_of_2(num_kv_heads),
                BLOCK_D=triton.next_power_of_2(half))
