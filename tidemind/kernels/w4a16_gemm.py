"""W4A16 GEMM for a few to a few hundred rows: x [M, K] (float) @ W [K, N] with W in AutoAWQ's GEMM
layout (layers/quantization/awq.py) or its K slabs (kernels/w4a16_layout.py), dequantized tile by
tile in registers, tl.dot on the tiles.

Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), splits). A program owns a [BLOCK_M, BLOCK_N] output tile
and walks its share of K (all of it when splits is 1; split_k.py splits K when the tiles are fewer
than programs_per_sm a SM, and adds the shares in the same launch) in tiles of BLOCK_K rows, where
BLOCK_K divides the group size, so each K tile lies in one group g = k0 // G:

    x      [BLOCK_M, BLOCK_K]                 the model dtype
    words  [BLOCK_K, BLOCK_N / 8] int32   ->  q [BLOCK_K, BLOCK_N] (nibble of column 8j + c at
                                              bits 4 * AWQ_SHIFT[c], see awq_nibble_shifts)
    zeros  [BLOCK_N / 8] int32 of group g ->  z [BLOCK_N];  scales [BLOCK_N] of group g
    acc   += x @ ((q - z) * s)                float32 accumulator

With SWAP_AB the program computes the transposed tile, acc^T [BLOCK_N, BLOCK_M] += ((q - z) * s)^T
@ x^T: the dequantized weights become the left operand, which Hopper's MMA reads from registers
(the right one must come from shared memory), and a few rows make a narrow BLOCK_M instead of a
16-row minimum.

Reference: awq_dequantize (layers/quantization/awq.py) followed by a matmul. N must be a multiple
of 8 (whole packed words); K a multiple of the group size; rows past M and columns past N masked.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .split_k import add_splits, arrival_counters, last_to_arrive, reset_arrivals, splits_for
from .w4a16_layout import (BIASED_BITS, PACK, awq_unpack, awq_unpack_biased, check_w4a16_args, k_tile,
                           slab_tile, unbiasing_offsets)


@dataclass(frozen=True)
class GemmConfig:
    """Tiles and launch options of the GEMM (block_k is capped by the group size)."""
    block_m: int
    block_n: int
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3
    swap_ab: bool = False
    programs_per_sm: int = 2  # K is split (split_k.py) when the output tiles alone are fewer


def default_config(m: int, n: int) -> GemmConfig:
    """The tiles for m rows of n columns: the fastest of `benchmarks/gpu_quant.py sweep` on an H200 at
    llama8b's shapes (BENCHMARKS.md), narrow column tiles keeping more programs for few rows."""
    if n <= 64 or m <= 32:
        return GemmConfig(block_m=16, block_n=64)
    return GemmConfig(block_m=32, block_n=128) if m <= 128 else GemmConfig(block_m=64, block_n=128)


@triton.jit
def _w4a16_gemm_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, partial_ptr, counter_ptr, M, N, K,
                       k_per_split, splits, group_size, biased_bits,
                       x_row_stride, qweight_row_stride, qzeros_row_stride, scales_row_stride, out_row_stride,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, SWAP_AB: tl.constexpr, SLABS: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)  # this program's K share: [split * k_per_split, + k_per_split)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M]
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] output columns
    words = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # [BLOCK_N / 8] packed columns
    ks = tl.arange(0, BLOCK_K)
    row_mask = rows < M
    col_mask = cols < N
    word_mask = words < N // 8
    x_rows = x_ptr + rows.to(tl.int64) * x_row_stride  # [BLOCK_M]
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(split * k_per_split, tl.minimum(split * k_per_split + k_per_split, K), BLOCK_K):
        group = k0 // group_size
        zero_words = tl.load(qzeros_ptr + group * qzeros_row_stride + words, mask=word_mask, other=0)
        scales = tl.load(scales_ptr + group * scales_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        offsets = unbiasing_offsets(tl.reshape(awq_unpack(zero_words), (BLOCK_N,)), scales)
        if SLABS:  # W^T [BLOCK_N, BLOCK_K] from slabs (kernels/w4a16_layout.py), transposed
            w = tl.trans(slab_tile(qweight_ptr, k0, cols, col_mask, N, biased_bits, BLOCK_K) * scales[:, None]
                         + offsets[:, None])
        else:
            packed = tl.load(qweight_ptr + (k0 + ks).to(tl.int64)[:, None] * qweight_row_stride + words[None, :],
                             mask=word_mask[None, :], other=0)  # [BLOCK_K, BLOCK_N / 8]
            biased = tl.reshape(awq_unpack_biased(packed, biased_bits), (BLOCK_K, BLOCK_N))  # 128 + q
            w = biased * scales[None, :] + offsets[None, :]  # [BLOCK_K, BLOCK_N] float32 (q - z) * s
        if SWAP_AB:
            x_t = tl.load(x_rows[None, :] + (k0 + ks)[:, None], mask=row_mask[None, :],
                          other=0.0)  # [BLOCK_K, BLOCK_M]
            acc += tl.dot(tl.trans(w.to(x_t.dtype)), x_t, input_precision=DOT_PRECISION)  # [BLOCK_N, BLOCK_M]
        else:
            x = tl.load(x_rows[:, None] + (k0 + ks)[None, :], mask=row_mask[:, None], other=0.0)  # [BLOCK_M, BLOCK_K]
            acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PRECISION)
    if SWAP_AB:
        tile = tl.trans(acc)  # [BLOCK_M, BLOCK_N]
    else:
        tile = acc
    out = out_ptr + rows.to(tl.int64)[:, None] * out_row_stride + cols[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if splits == 1:
        tl.store(out, tile.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # partials [splits, M, N]; the tile's last split to arrive adds them (split_k.py)
        in_split = rows.to(tl.int64)[:, None] * N + cols[None, :]
        tl.store(partial_ptr + split * M * N + in_split, tile, mask=mask)
        tile_index = pid_m * tl.num_programs(1) + pid_n
        if last_to_arrive(counter_ptr, tile_index, splits):
            total = add_splits(partial_ptr, in_split, M * N, splits, mask)
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=mask)
            reset_arrivals(counter_ptr, tile_index)


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, config: Optional[GemmConfig] = None) -> torch.Tensor:
    """x [M, K] @ dequantized W [K, N] -> new [M, N] in x's dtype.

    qweight [K, N / 8] int32 or its slabs [K / 32, N, 4] (kernels/w4a16_layout.py), qzeros
    [K / G, N / 8] int32 (AWQ order), scales [K / G, N]; G a multiple of 16 dividing K (of 32 for
    slabs). No host synchronization (CUDA-graph safe).
    """
    m, k = x.shape
    slabs = qweight.dim() == 3
    n = qweight.shape[1] if slabs else qweight.shape[1] * PACK
    config = config or default_config(m, n)
    block_k = k_tile(group_size, config.block_k)
    check_w4a16_args("w4a16_gemm", x, qweight, qzeros, scales, group_size, block_k)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    k_tiles = k // block_k
    splits = splits_for(tiles, k_tiles, x.device, config.programs_per_sm) if config.programs_per_sm else 1
    k_per_split = triton.cdiv(k_tiles, splits) * block_k
    splits = triton.cdiv(k, k_per_split)  # no empty share
    counters = arrival_counters(x.device, tiles if splits > 1 else 0, "w4a16_gemm")
    partials = torch.empty((splits, m, n) if splits > 1 else (1,), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, config.block_m), triton.cdiv(n, config.block_n), splits)
    _w4a16_gemm_kernel[grid](x, qweight, qzeros, scales, out, partials, counters, m, n, k, k_per_split, splits,
                             group_size, BIASED_BITS,
                             x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
                             BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
                             DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
                             SWAP_AB=config.swap_ab, SLABS=slabs, num_warps=config.num_warps,
                             num_stages=config.num_stages)
    return out
