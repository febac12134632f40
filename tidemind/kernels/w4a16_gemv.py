"""W4A16 GEMV for decode-shaped inputs (a few rows): x [M, K] @ W [K, N], W in AutoAWQ's GEMM
layout, dequantized in registers; no tl.dot (a row is too few for its 16-row minimum): products
are summed over K in float32.

Grid (cdiv(N, BLOCK_N), splits). One program owns BLOCK_N output columns of every row (all M <= 4
rows share each weight tile it loads: the weights are read once) and a share of K (k_per_split
rows, whole groups), walked in BLOCK_K tiles (a group's scales at its first). Columns are [BLOCK_N / 8, 8]
(packed word, column within it), which is how they unpack.

The loop (docs/GPU_NOTES.md, sections 7 and 8, on what was tried on an H200 and what it gave):
- awq_unpack_biased turns a nibble into the float 128 + q with a shift or two and one logic op
  (no int-to-float conversion); the group's W = (128 + q) * s - (128 + z) * s is one multiply-add;
- products are summed elementwise into [BLOCK_K, BLOCK_N / 8, 8] accumulators laid out as the
  unpacked tile, and over K once after the loop: nothing crosses threads inside it for the sums
  (a per-tile sum over K did, and so did any tensor whose own layout met the tile's: the row
  accumulators are separate, the scales load as pairs, see _group_params);
- Triton's software pipeliner copies the weight and x tiles STAGES - 1 iterations ahead, and a
  group's scales and zero points are requested a group before their use.

The weights stream once, so the GPU needs several programs per SM to cover the memory latency: few
columns (N / BLOCK_N below programs_per_sm x SMs) split K, reduced in the same launch (split_k.py:
float32 partials [splits, M, N], the column block's last program to arrive adds them).

Reference: awq_dequantize (layers/quantization/awq.py) followed by a matmul.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .split_k import add_splits, arrival_counters, last_to_arrive, reset_arrivals, splits_for
from .w4a16_layout import (BIASED_BITS, PACK, awq_unpack, awq_unpack_biased, check_w4a16_args, k_tile,
                           unbiasing_offsets)

MAX_ROWS = 4  # rows one launch takes (a constexpr loop bound: 1, 2 or 4 after rounding up)


@dataclass(frozen=True)
class GemvConfig:
    """Tile sizes and launch width of the GEMV. block_k is capped by the group size (a tile lies
    in one group); programs_per_sm sets how far K is split when the columns alone are too few."""
    block_n: int
    block_k: int
    num_warps: int = 4
    programs_per_sm: int = 4
    stages: int = 3  # tiles in flight: the software pipeline's depth


# One row: the fastest of `benchmarks/gpu_quant.py sweep` on an H200 at llama8b's four shapes
# (BENCHMARKS.md, 2026-11-29 third session: two packed words a thread per tile, 2-warp programs, 8 a
# SM, 5 stages). A few rows: a tile of the same two words a thread with 4 warps, the smallest that
# keeps four rows' accumulators free of spills (benchmarks/compile_sm90.py); not yet swept on a GPU
DEFAULT_CONFIG = GemvConfig(block_n=64, block_k=16, num_warps=2, programs_per_sm=8, stages=5)
FEW_ROWS_CONFIG = GemvConfig(block_n=128, block_k=16, num_warps=4, programs_per_sm=4, stages=5)


@triton.jit
def _weight_tile(qweight_ptr, k0, ks, k_end, words, word_mask, qweight_row_stride):
    """Packed weights [BLOCK_K, BLOCK_N / 8] of rows k0 + ks; rows at or past k_end read as 0."""
    k_mask = (k0 + ks) < k_end
    return tl.load(qweight_ptr + (k0 + ks).to(tl.int64)[:, None] * qweight_row_stride + words[None, :],
                   mask=k_mask[:, None] & word_mask[None, :], other=0, eviction_policy="evict_first")


@triton.jit
def _x_tile(x_ptr, r, M, k0, k_end, x_row_stride, BLOCK_K: tl.constexpr, X_PAIRS: tl.constexpr, X_BF16: tl.constexpr):
    """Row r of x at k0 .. k0 + BLOCK_K as float32 [BLOCK_K]; zeros past k_end, or for a row past M.
    X_PAIRS: 16-bit x read as int32 pairs (x_ptr and x_row_stride in int32 units), which Triton's
    pipeliner can copy ahead (it copies 4 bytes a thread or more, not a lone 16-bit value)."""
    if X_PAIRS:
        halves = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        pairs = tl.load(x_ptr + r * x_row_stride + halves, mask=(halves < k_end // 2) & (r < M), other=0)
        return widen_pairs(pairs, X_BF16)
    ks = k0 + tl.arange(0, BLOCK_K)
    return tl.load(x_ptr + r * x_row_stride + ks, mask=(ks < k_end) & (r < M), other=0.0).to(tl.float32)


@triton.jit
def emit_row(result, r, M, N, cols, col_mask, split, splits, out_ptr, out_row_stride, partial_ptr,
             ROWS: tl.constexpr):
    """Row r's sums (any shape, as cols and col_mask) of this split: the output itself when K is not
    split, else the split's partials (partials [splits, ROWS, N], added by reduce_splits)."""
    if splits == 1:
        tl.store(out_ptr + r * out_row_stride + cols, result.to(out_ptr.dtype.element_ty), mask=col_mask & (r < M))
    else:
        tl.store(partial_ptr + (split * ROWS + r) * N + cols, result, mask=col_mask)


@triton.jit
def reduce_splits(pid_n, M, N, cols, col_mask, splits, out_ptr, out_row_stride, partial_ptr, counter_ptr,
                  ROWS: tl.constexpr):
    """After this program's emit_row calls: the last of column block pid_n's splits to arrive adds
    each row's partials and writes the output (split_k.py)."""
    if last_to_arrive(counter_ptr, pid_n, splits):
        for r in tl.static_range(ROWS):
            total = add_splits(partial_ptr + r * N, cols, ROWS * N, splits, col_mask)
            tl.store(out_ptr + r * out_row_stride + cols, total.to(out_ptr.dtype.element_ty),
                     mask=col_mask & (r < M))
        reset_arrivals(counter_ptr, pid_n)


@triton.jit
def _group_params(scale_pairs_ptr, qzeros_ptr, group, words, word_mask, scales_row_stride, qzeros_row_stride):
    """A group's scales as int32 pairs of 16-bit floats [BLOCK_N / 8, 4] (columns 2i in the low half,
    2i + 1 in the high) and its packed zero points [BLOCK_N / 8]. Pairs: half the elements of a
    [BLOCK_N] load, which keeps this load from deciding the layout of the weights' registers (Triton
    lays out the tensors that meet a big load to match it, so a [BLOCK_N] load here had every
    dequantized tile moved through shared memory to the scales' layout)."""
    pairs = tl.load(scale_pairs_ptr + group * (scales_row_stride // 2) + words[:, None] * 4 + tl.arange(0, 4)[None, :],
                    mask=word_mask[:, None], other=0)
    zero_words = tl.load(qzeros_ptr + group * qzeros_row_stride + words, mask=word_mask, other=0)
    return pairs, zero_words


@triton.jit
def widen_pairs(pairs, BF16: tl.constexpr):
    """int32 pairs [..., P] of 16-bit floats (element 2i in the low half, 2i + 1 in the high) ->
    float32 [..., 2P] in element order."""
    if BF16:  # bfloat16 is float32's upper half
        low = (pairs << 16).to(tl.float32, bitcast=True)
        high = (pairs & -65536).to(tl.float32, bitcast=True)
    else:
        low = (pairs & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        high = (pairs >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return tl.reshape(tl.join(low, high), pairs.shape[:-1] + [2 * pairs.shape[-1]])


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qweight_ptr, qzeros_ptr, scale_pairs_ptr, out_ptr, partial_ptr, counter_ptr,
                       M, N, K, k_per_split, splits, biased_bits,
                       x_row_stride, qweight_row_stride, qzeros_row_stride, scales_row_stride, out_row_stride,
                       GROUP_SIZE: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       STAGES: tl.constexpr, SCALES_BF16: tl.constexpr, X_PAIRS: tl.constexpr,
                       X_BF16: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    words = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # [BLOCK_N / 8]
    cols = words[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BLOCK_N / 8, 8] output columns
    word_mask = words < N // 8
    ks = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)  # this split's rows: [k_start, k_end), whole groups
    # Each row's products are summed elementwise, [BLOCK_K, BLOCK_N / 8, 8] in the layout of the
    # unpacked tile, and over K once after the loop: nothing crosses threads inside the loop. One
    # accumulator per row (a leading row dimension would give the product a layout of its own, and
    # every tile would be moved to it through shared memory).
    acc0 = tl.zeros((BLOCK_K, BLOCK_N // 8, 8), dtype=tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    scales = tl.zeros((BLOCK_N // 8, 8), dtype=tl.float32)
    offsets = scales
    # a group's scales and zero points are requested a group ahead of their use
    next_pairs, next_zero_words = _group_params(scale_pairs_ptr, qzeros_ptr, k_start // GROUP_SIZE, words, word_mask,
                                                  scales_row_stride, qzeros_row_stride)
    # STAGES: Triton's software pipeliner keeps the tile and x loads STAGES - 1 iterations ahead
    # (through shared memory); a tile carried in registers instead waited at each copy of a register
    # still being loaded (the GPU does not rename registers): a lookahead of one iteration at most
    for kk in tl.range(0, k_end - k_start, BLOCK_K, num_stages=STAGES):  # the last split may be shorter
        k0 = k_start + kk
        tile = _weight_tile(qweight_ptr, k0, ks, k_end, words, word_mask, qweight_row_stride)
        x0 = _x_tile(x_ptr, 0, M, k0, k_end, x_row_stride, BLOCK_K, X_PAIRS, X_BF16)
        if ROWS > 1:
            x1 = _x_tile(x_ptr, 1, M, k0, k_end, x_row_stride, BLOCK_K, X_PAIRS, X_BF16)
        if ROWS > 2:
            x2 = _x_tile(x_ptr, 2, M, k0, k_end, x_row_stride, BLOCK_K, X_PAIRS, X_BF16)
            x3 = _x_tile(x_ptr, 3, M, k0, k_end, x_row_stride, BLOCK_K, X_PAIRS, X_BF16)
        if kk % GROUP_SIZE == 0:  # a new group: W = (128 + q) * s - (128 + z) * s, one multiply-add
            scales = widen_pairs(next_pairs, SCALES_BF16)
            offsets = unbiasing_offsets(awq_unpack(next_zero_words), scales)  # [BLOCK_N / 8, 8]
            following = tl.where(k0 + GROUP_SIZE < k_end, k0 // GROUP_SIZE + 1, k0 // GROUP_SIZE)
            next_pairs, next_zero_words = _group_params(scale_pairs_ptr, qzeros_ptr, following, words, word_mask,
                                                          scales_row_stride, qzeros_row_stride)
        w = awq_unpack_biased(tile, biased_bits) * scales[None, :, :] + offsets[None, :, :]  # [BLOCK_K, BLOCK_N / 8, 8]
        acc0 += x0[:, None, None] * w
        if ROWS > 1:
            acc1 += x1[:, None, None] * w
        if ROWS > 2:
            acc2 += x2[:, None, None] * w
            acc3 += x3[:, None, None] * w
    # splits == 1: each row straight to the output; else to partials [splits, ROWS, N]
    col_mask = word_mask[:, None]
    emit_row(tl.sum(acc0, axis=0), 0, M, N, cols, col_mask, split, splits, out_ptr, out_row_stride, partial_ptr, ROWS)
    if ROWS > 1:
        emit_row(tl.sum(acc1, axis=0), 1, M, N, cols, col_mask, split, splits, out_ptr, out_row_stride, partial_ptr,
                 ROWS)
    if ROWS > 2:
        emit_row(tl.sum(acc2, axis=0), 2, M, N, cols, col_mask, split, splits, out_ptr, out_row_stride, partial_ptr,
                 ROWS)
        emit_row(tl.sum(acc3, axis=0), 3, M, N, cols, col_mask, split, splits, out_ptr, out_row_stride, partial_ptr,
                 ROWS)
    if splits > 1:
        reduce_splits(pid_n, M, N, cols, col_mask, splits, out_ptr, out_row_stride, partial_ptr, counter_ptr, ROWS)


def split_count(n: int, k: int, group_size: int, block_n: int, device: torch.device,
                programs_per_sm: int = DEFAULT_CONFIG.programs_per_sm) -> int:
    """How many K shares (of whole groups) give programs_per_sm programs per SM (1 when the column
    blocks alone do; the rows do not count: one program serves every row)."""
    return splits_for(triton.cdiv(n, block_n), k // group_size, device, programs_per_sm)


def x_as_pairs(x: torch.Tensor):
    """(x argument, its row stride, whether pairs): 16-bit x as int32 pairs (see _x_tile) where its
    rows start on 4-byte boundaries, else x itself."""
    if x.element_size() == 2 and x.stride(0) % 2 == 0 and x.storage_offset() % 2 == 0:
        return x.view(torch.int32), x.stride(0) // 2, True
    return x, x.stride(0), False


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, config: Optional[GemvConfig] = None) -> torch.Tensor:
    """x [M, K] @ dequantized W [K, N] -> new [M, N] in x's dtype, for M <= MAX_ROWS. Arguments as
    w4a16_gemm's. One launch, no host synchronization (CUDA-graph safe)."""
    config = config or (DEFAULT_CONFIG if x.shape[0] <= 1 else FEW_ROWS_CONFIG)
    block_k = k_tile(group_size, config.block_k)
    if qweight.dim() != 2:
        raise ValueError("w4a16_gemv: qweight must be AutoAWQ's [K, N / 8] (slabs take w4a16_gemv_slabs)")
    check_w4a16_args("w4a16_gemv", x, qweight, qzeros, scales, group_size, block_k)
    m, k = x.shape
    if scales.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"w4a16_gemv: scales must be float16 or bfloat16 (read as pairs), got {scales.dtype}")
    if m > MAX_ROWS:
        raise ValueError(f"w4a16_gemv: at most {MAX_ROWS} rows, got {m} (use w4a16_gemm)")
    n = qweight.shape[1] * PACK
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    block_n = min(config.block_n, max(64, triton.next_power_of_2(n)))
    splits = split_count(n, k, group_size, block_n, x.device, config.programs_per_sm)
    groups_per_split = triton.cdiv(k // group_size, splits)
    splits = triton.cdiv(k // group_size, groups_per_split)  # no empty share
    rows = triton.next_power_of_2(m)
    column_blocks = triton.cdiv(n, block_n)
    counters = arrival_counters(x.device, column_blocks, "w4a16_gemv")
    partials = torch.empty((splits, rows, n) if splits > 1 else (1,), dtype=torch.float32, device=x.device)
    x_arg, x_row_stride, x_pairs = x_as_pairs(x)
    _w4a16_gemv_kernel[(column_blocks, splits)](
        x_arg, qweight, qzeros, scales.view(torch.int32), out, partials, counters, m, n, k,
        groups_per_split * group_size, splits, BIASED_BITS, x_row_stride, qweight.stride(0), qzeros.stride(0),
        scales.stride(0), out.stride(0),
        GROUP_SIZE=group_size, ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, STAGES=config.stages,
        SCALES_BF16=scales.dtype == torch.bfloat16, X_PAIRS=x_pairs, X_BF16=x.dtype == torch.bfloat16,
        num_warps=config.num_warps)
    return out
