"""W4A16 GEMV for decode-shaped inputs (a few rows): x [M, K] @ W [K, N], W in AutoAWQ's GEMM
layout, dequantized in registers; no tl.dot (a row is too few for its 16-row minimum): products
are summed over K in float32.

Grid (cdiv(N, BLOCK_N), SPLIT_K, M). One program owns BLOCK_N output columns of one row and a
share of K (K_PER_SPLIT rows, whole groups, walked in BLOCK_K tiles that each lie in one group).
Inside a group the zero point and scale are common to the tile, so

    sum_k x[k] * (q[k, n] - z[n]) * s[n] = s[n] * (sum_k x[k] * q[k, n]  -  z[n] * sum_k x[k])

Columns are held as [BLOCK_N / 8, 8] (packed word, column within it), which is how they unpack.
With SPLIT_K > 1 each program writes float32 partial sums [SPLIT_K, M, N], reduced by a sum; the
split depends only on host values (shapes, SM count), so launches can be captured in CUDA graphs.

Reference: awq_dequantize (layers/quantization/awq.py) followed by a matmul.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .int_to_float import small_int_to_float
from .w4a16_gemm import PACK, awq_nibble_shifts, check_w4a16_args, k_tile

_TARGET_WAVES = 2  # programs aimed at, in multiples of the SM count, when splitting K
_MAX_SPLITS = 16
_CPU_SM_COUNT = 4  # stands in for the SM count under the Triton interpreter (CPU tensors)


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, N, K, group_size, k_per_split,
                       x_row_stride, qweight_row_stride, qzeros_row_stride, scales_row_stride,
                       out_split_stride, out_row_stride,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    row = tl.program_id(2).to(tl.int64)
    words = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # [BLOCK_N / 8]
    cols = words[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BLOCK_N / 8, 8] output columns
    word_mask = words < N // 8
    shifts = awq_nibble_shifts()
    ks = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    acc = tl.zeros((BLOCK_N // 8, 8), dtype=tl.float32)
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = k_start + kk
        k_mask = (k0 + ks) < K  # the last split may run past K
        x = tl.load(x_ptr + row * x_row_stride + k0 + ks, mask=k_mask, other=0.0).to(tl.float32)  # [BLOCK_K]
        packed = tl.load(qweight_ptr + (k0 + ks).to(tl.int64)[:, None] * qweight_row_stride + words[None, :],
                         mask=k_mask[:, None] & word_mask[None, :], other=0)  # [BLOCK_K, BLOCK_N / 8]
        q = small_int_to_float((packed[:, :, None] >> shifts[None, None, :]) & 0xF)  # [BLOCK_K, BLOCK_N / 8, 8]
        group = k0 // group_size
        in_range = word_mask & (k0 < K)
        zero_words = tl.load(qzeros_ptr + group * qzeros_row_stride + words, mask=in_range, other=0)
        zeros = ((zero_words[:, None] >> shifts[None, :]) & 0xF).to(tl.float32)  # [BLOCK_N / 8, 8]
        scales = tl.load(scales_ptr + group * scales_row_stride + cols, mask=in_range[:, None],
                         other=0.0).to(tl.float32)
        xq = tl.sum(x[:, None, None] * q, axis=0)  # [BLOCK_N / 8, 8]
        acc += scales * (xq - zeros * tl.sum(x, axis=0))
    out = out_ptr + split * out_split_stride + row * out_row_stride + cols
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=word_mask[:, None])


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


def split_count(m: int, n: int, k: int, group_size: int, block_n: int, device: torch.device) -> int:
    """How many K shares (of whole groups) fill the GPU: enough programs for _TARGET_WAVES waves."""
    programs = m * triton.cdiv(n, block_n)
    sm_count = _sm_count(device)
    if programs >= sm_count:
        return 1
    wanted = triton.cdiv(_TARGET_WAVES * sm_count, programs)
    return max(1, min(wanted, _MAX_SPLITS, k // group_size))


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int) -> torch.Tensor:
    """x [M, K] @ dequantized W [K, N] -> new [M, N] in x's dtype, for small M (one program per
    row and column block). Arguments as w4a16_gemm's. No host synchronization (CUDA-graph safe)."""
    block_k = k_tile(group_size, 32)
    check_w4a16_args("w4a16_gemv", x, qweight, qzeros, scales, group_size, block_k)
    m, k = x.shape
    n = qweight.shape[1] * PACK
    block_n = 256 if n >= 256 else 64
    splits = split_count(m, n, k, group_size, block_n, x.device)
    groups_per_split = triton.cdiv(k // group_size, splits)
    splits = triton.cdiv(k // group_size, groups_per_split)  # no empty share
    k_per_split = groups_per_split * group_size
    if splits == 1:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        split_stride = 0
    else:
        out = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        split_stride = out.stride(0)
    if m == 0:
        return out if splits == 1 else out.sum(0).to(x.dtype)
    grid = (triton.cdiv(n, block_n), splits, m)
    _w4a16_gemv_kernel[grid](x, qweight, qzeros, scales, out, n, k, group_size, k_per_split,
                             x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0),
                             split_stride, out.stride(-2), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4)
    return out if splits == 1 else out.sum(0).to(x.dtype)
