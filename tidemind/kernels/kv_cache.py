"""Store the step's new keys and values in their paged-cache slots, one program per token.

Reference: kernels/reference.py (write_kv_cache_split).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _write_kv_cache_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
                           key_token_stride, key_head_stride, value_token_stride, value_head_stride,
                           cache_block_stride, cache_slot_stride, cache_head_stride, num_kv_heads,
                           HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_H: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)  # block_id * BLOCK_SIZE + offset; < 0: skip
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_DIM)[None, :] & (slot >= 0)  # [BLOCK_H, BLOCK_D]
    key = tl.load(key_ptr + token * key_token_stride + heads[:, None] * key_head_stride + dims[None, :], mask=mask)
    value = tl.load(value_ptr + token * value_token_stride + heads[:, None] * value_head_stride + dims[None, :],
                    mask=mask)
    cache_offsets = ((slot // BLOCK_SIZE) * cache_block_stride + (slot % BLOCK_SIZE) * cache_slot_stride
                     + heads[:, None] * cache_head_stride + dims[None, :])
    tl.store(key_cache_ptr + cache_offsets, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + cache_offsets, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


def _check(key, value, key_cache, value_cache, slot_mapping) -> None:
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"write_kv_cache: key_cache {key_cache.dtype} {tuple(key_cache.shape)} and value_cache "
                         f"{value_cache.dtype} {tuple(value_cache.shape)} must both be "
                         "[num_blocks, block_size, num_kv_heads, head_dim] of one dtype")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("write_kv_cache: key_cache and value_cache must be contiguous")
    if key_cache.dtype not in _DTYPES:
        raise ValueError(f"write_kv_cache: cache dtype {key_cache.dtype} is not one of {_DTYPES}")
    block_size = key_cache.shape[1]
    if block_size & (block_size - 1):
        raise ValueError(f"write_kv_cache: block_size {block_size} must be a power of two")
    expected = (slot_mapping.shape[0],) + tuple(key_cache.shape[2:])
    for name, x in (("key", key), ("value", value)):
        if tuple(x.shape) != expected or x.stride(2) != 1:
            raise ValueError(f"write_kv_cache: {name} must be {list(expected)} [T, num_kv_heads, head_dim] with a "
                             f"contiguous last dim, got {tuple(x.shape)} strides {x.stride()}")
        if x.dtype not in _DTYPES or x.device != key_cache.device:
            raise ValueError(f"write_kv_cache: {name} is {x.dtype} on {x.device}; want one of {_DTYPES} on "
                             f"{key_cache.device}")
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"write_kv_cache: slot_mapping must be [T] int32 / int64, got {slot_mapping.dtype} "
                         f"{tuple(slot_mapping.shape)}")
    if slot_mapping.device != key_cache.device:
        raise ValueError(f"write_kv_cache: slot_mapping is on {slot_mapping.device}, the cache on {key_cache.device}")


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """key_cache / value_cache [num_blocks, block_size, KVH, D] at flat slot slot_mapping[t]
    (block_id * block_size + offset) <- key[t] / value[t] cast to the cache dtype; tokens with a
    negative slot are skipped (padding rows of CUDA-graph batches use -1).

    key, value: [T, KVH, D], last dim contiguous, any token / head strides (views into a fused qkv
    output); slot_mapping: [T] int32 / int64, each slot < num_blocks * block_size (not checked).
    """
    _check(key, value, key_cache, value_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _write_kv_cache_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0),
        value.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), num_kv_heads,
        HEAD_DIM=head_dim, BLOCK_SIZE=key_cache.shape[1], BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)
