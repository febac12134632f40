"""W4A16 GEMV on weights repacked into K slabs (kernels/w4a16_layout.py: qweight [K / 32, N, 4], a
column's 32 rows of a slab in 4 consecutive words): x [M, K] @ W [K, N] for M <= 4 rows, the sums
over K kept inside each thread.

Why: in AutoAWQ's layout a word holds 8 columns of one k, so a GEMV thread holds few k per column
and sums over K elementwise, one accumulator a weight, and each of its weights needs two multiply-
adds (dequantize, multiply). Here one thread reads a column's 32 values of a slab as one 16-byte
load and sums them in registers: sum_k x_k (128 + q_k) is one multiply-add a weight, and the
group's scale and zero point apply once a slab per column, acc += s * dot + -(128 + z) * s * sum(x).
On an H200 the SASS holds ~4.3 instructions a weight against ~7 in AutoAWQ's layout, and a llama8b
layer's four GEMVs take 64.7 us against 102.7 (1.8x bf16 cuBLAS; docs/GPU_NOTES.md section 9).

Grid (cdiv(N, BLOCK_N), splits): a program owns BLOCK_N columns of every row and a share of the
slabs (whole groups); splits are reduced in the same launch as in w4a16_gemv.py (partials, arrival
counters, the last program adds them in split order). Reference: awq_dequantize then a matmul.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .split_k import arrival_counters
from .w4a16_gemv import MAX_ROWS, emit_row, reduce_splits, split_count, widen_pairs, x_as_pairs
from .w4a16_layout import (BIASED_BITS, KERNEL_SLAB_WORDS, SLAB, SLAB_WORDS, awq_column_values, awq_unpack_biased,
                           check_w4a16_args, unbiasing_offsets)

_SLAB = tl.constexpr(SLAB)  # readable inside the kernels


@dataclass(frozen=True)
class SlabGemvConfig:
    """block_n columns a program (block_n / (32 x num_warps) a thread), programs_per_sm as in
    GemvConfig, stages: the software pipeline's depth in slabs."""
    block_n: int = 256
    num_warps: int = 2
    programs_per_sm: int = 8
    stages: int = 3


# From `benchmarks/gpu_quant.py sweep` on an H200 at llama8b's four shapes (BENCHMARKS.md, 2026-11-29
# fourth session): 4 columns a thread; one row within 2% of the best (512 columns, 4 warps), and 2-4
# rows best with half the programs (more rows, more registers a program)
DEFAULT_CONFIG = SlabGemvConfig()
FEW_ROWS_CONFIG = SlabGemvConfig(programs_per_sm=4)


@triton.jit
def _slab_x(x_ptr, r, M, t, x_row_stride, X_PAIRS: tl.constexpr, X_BF16: tl.constexpr):
    """Row r of x at slab t as float32 [4, 8] (k = 32t + 8j + i); zeros for a row past M. X_PAIRS:
    16-bit x read as int32 pairs (x_ptr and x_row_stride in int32 units)."""
    j = tl.arange(0, KERNEL_SLAB_WORDS)
    if X_PAIRS:
        pairs = tl.load(x_ptr + r * x_row_stride + t * (_SLAB // 2) + j[:, None] * 4 + tl.arange(0, 4)[None, :],
                        mask=r < M, other=0)
        return widen_pairs(pairs, X_BF16)
    ks = t * _SLAB + j[:, None] * 8 + tl.arange(0, 8)[None, :]
    return tl.load(x_ptr + r * x_row_stride + ks, mask=r < M, other=0.0).to(tl.float32)


@triton.jit
def _slab_row_sums(biased, x):
    """(sum_k x_k (128 + q_k) per column [BLOCK_N], sum_k x_k) of one slab: biased [BLOCK_N, 4, 8],
    x [4, 8]; every term of a column in its own thread. One sum over the 32 (not 8, then 4): the
    compiler chains its products into 32 multiply-adds (the two-level sum took 35 instructions)."""
    products = tl.reshape(biased * x[None, :, :], (biased.shape[0], _SLAB))
    return tl.sum(products, axis=1), tl.sum(tl.reshape(x, (_SLAB,)), axis=0)


@triton.jit
def _w4a16_gemv_slabs_kernel(x_ptr, slabs_ptr, qzeros_ptr, scales_ptr, out_ptr, partial_ptr, counter_ptr,
                             M, N, total_slabs, slabs_per_split, splits, biased_bits,
                             x_row_stride, qzeros_row_stride, scales_row_stride, out_row_stride,
                             SLABS_PER_GROUP: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                             STAGES: tl.constexpr, X_PAIRS: tl.constexpr, X_BF16: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N]
    col_mask = cols < N
    # [BLOCK_N, 4]: each column's words within a slab
    words = cols.to(tl.int64)[:, None] * KERNEL_SLAB_WORDS + tl.arange(0, KERNEL_SLAB_WORDS)[None, :]
    t_start = split * slabs_per_split
    t_end = tl.minimum(t_start + slabs_per_split, total_slabs)  # [t_start, t_end): whole groups
    acc0 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    scales = acc0
    offsets = acc0
    group = t_start // SLABS_PER_GROUP
    next_scales = tl.load(scales_ptr + group * scales_row_stride + cols, mask=col_mask, other=0.0)
    next_zero_words = tl.load(qzeros_ptr + group * qzeros_row_stride + cols // 8, mask=col_mask, other=0)
    for tt in tl.range(0, t_end - t_start, num_stages=STAGES):
        t = t_start + tt
        tile = tl.load(slabs_ptr + t.to(tl.int64) * N * KERNEL_SLAB_WORDS + words, mask=col_mask[:, None], other=0,
                       eviction_policy="evict_first")  # [BLOCK_N, 4]
        biased = awq_unpack_biased(tile, biased_bits)  # [BLOCK_N, 4, 8] 128 + q
        x0 = _slab_x(x_ptr, 0, M, t, x_row_stride, X_PAIRS, X_BF16)
        if ROWS > 1:
            x1 = _slab_x(x_ptr, 1, M, t, x_row_stride, X_PAIRS, X_BF16)
        if ROWS > 2:
            x2 = _slab_x(x_ptr, 2, M, t, x_row_stride, X_PAIRS, X_BF16)
            x3 = _slab_x(x_ptr, 3, M, t, x_row_stride, X_PAIRS, X_BF16)
        if tt % SLABS_PER_GROUP == 0:  # a new group; the next one's scales and zeros requested now
            scales = next_scales.to(tl.float32)
            offsets = unbiasing_offsets(awq_column_values(next_zero_words, cols), scales)
            group = tl.where(t + SLABS_PER_GROUP < t_end, t // SLABS_PER_GROUP + 1, t // SLABS_PER_GROUP)
            next_scales = tl.load(scales_ptr + group * scales_row_stride + cols, mask=col_mask, other=0.0)
            next_zero_words = tl.load(qzeros_ptr + group * qzeros_row_stride + cols // 8, mask=col_mask, other=0)
        dot, x_sum = _slab_row_sums(biased, x0)
        acc0 += dot * scales + x_sum * offsets
        if ROWS > 1:
            dot, x_sum = _slab_row_sums(biased, x1)
            acc1 += dot * scales + x_sum * offsets
        if ROWS > 2:
            dot, x_sum = _slab_row_sums(biased, x2)
            acc2 += dot * scales + x_sum * offsets
            dot, x_sum = _slab_row_sums(biased, x3)
            acc3 += dot * scales + x_sum * offsets
    emit_row(acc0, 0, M, N, cols, col_mask, split, splits, out_ptr, out_row_stride, partial_ptr, ROWS)
    if ROWS > 1:
        emit_row(acc1, 1, M, N, cols, col_mask, split, splits, out_ptr, out_row_stride, partial_ptr, ROWS)
    if ROWS > 2:
        emit_row(acc2, 2, M, N, cols, col_mask, split, splits, out_ptr, out_row_stride, partial_ptr, ROWS)
        emit_row(acc3, 3, M, N, cols, col_mask, split, splits, out_ptr, out_row_stride, partial_ptr, ROWS)
    if splits > 1:
        reduce_splits(pid_n, M, N, cols, col_mask, splits, out_ptr, out_row_stride, partial_ptr, counter_ptr, ROWS)


def w4a16_gemv_slabs(x: torch.Tensor, slabs: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     group_size: int, config: Optional[SlabGemvConfig] = None) -> torch.Tensor:
    """x [M, K] @ dequantized W [K, N] -> new [M, N] in x's dtype, M <= MAX_ROWS, W as slabs
    [K / 32, N, 4] (awq_to_slabs) with AutoAWQ's qzeros [K / G, N / 8] and scales [K / G, N]. One
    launch, no host synchronization (CUDA-graph safe)."""
    if slabs.dim() != 3:
        raise ValueError(f"w4a16_gemv_slabs: slabs must be [K / {SLAB}, N, {SLAB_WORDS}] (awq_to_slabs), got "
                         f"{tuple(slabs.shape)}")
    check_w4a16_args("w4a16_gemv_slabs", x, slabs, qzeros, scales, group_size, SLAB)
    m, k = x.shape
    n = slabs.shape[1]
    groups = k // group_size
    if m > MAX_ROWS:
        raise ValueError(f"w4a16_gemv_slabs: at most {MAX_ROWS} rows, got {m}")
    config = config or (DEFAULT_CONFIG if m <= 1 else FEW_ROWS_CONFIG)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    splits = split_count(n, k, group_size, config.block_n, x.device, config.programs_per_sm)
    groups_per_split = triton.cdiv(groups, splits)
    splits = triton.cdiv(groups, groups_per_split)  # no empty share
    rows = triton.next_power_of_2(m)
    column_blocks = triton.cdiv(n, config.block_n)
    counters = arrival_counters(x.device, column_blocks, "w4a16_gemv_slabs")
    partials = torch.empty((splits, rows, n) if splits > 1 else (1,), dtype=torch.float32, device=x.device)
    x_arg, x_row_stride, x_pairs = x_as_pairs(x)
    _w4a16_gemv_slabs_kernel[(column_blocks, splits)](
        x_arg, slabs, qzeros, scales, out, partials, counters, m, n, k // SLAB, groups_per_split * group_size // SLAB,
        splits, BIASED_BITS, x_row_stride, qzeros.stride(0), scales.stride(0), out.stride(0),
        SLABS_PER_GROUP=group_size // SLAB, ROWS=rows, BLOCK_N=config.block_n, STAGES=config.stages, X_PAIRS=x_pairs,
        X_BF16=x.dtype == torch.bfloat16, num_warps=config.num_warps)
    return out
