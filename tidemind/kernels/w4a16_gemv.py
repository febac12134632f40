"""W4A16 GEMV for decode-shaped inputs (a few rows): x [M, K] @ W [K, N], W in AutoAWQ's GEMM
layout, dequantized in registers; no tl.dot (a row is too few for its 16-row minimum): products
are summed over K in float32.

Grid (cdiv(N, BLOCK_N), splits). One program owns BLOCK_N output columns of every row (all M <= 4
rows share each weight tile it loads: the weights are read once) and a share of K (k_per_split
rows, whole groups), walked in BLOCK_K tiles that each lie in one group. Inside a group the zero
point and scale are common to the tile, so

    sum_k x[k] * (q[k, n] - z[n]) * s[n] = s[n] * (sum_k x[k] * q[k, n]  -  z[n] * sum_k x[k])

Columns are held as [BLOCK_N / 8, 8] (packed word, column within it), which is how they unpack.

The weights stream once, so the GPU needs several programs per SM to cover the memory latency: few
columns (N / BLOCK_N below programs_per_sm x SMs) split K. On an H200 the kernel is then bound by
its instructions per weight (shift, mask, conversion, multiply-add), not by bandwidth
(docs/GPU_NOTES.md, section 7). The splits are reduced in the same launch: each program
writes its float32 partial sums [splits, M, N] and bumps its column block's arrival counter; the
last to arrive adds the partials in split order (deterministic), writes the output and resets the
counter to 0 for the next launch. The counters live in one zeroed int32 buffer per device; the
launches of a device run on one stream at a time (the engine's invariant), so no two GEMVs share
a counter at once. The split depends only on host values (shapes, SM count), so launches can be
captured in CUDA graphs.

Reference: awq_dequantize (layers/quantization/awq.py) followed by a matmul.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import triton
import triton.language as tl

from .int_to_float import small_int_to_float
from .w4a16_gemm import PACK, awq_unpack, check_w4a16_args, k_tile

MAX_ROWS = 4  # rows one launch takes (a constexpr loop bound: 1, 2 or 4 after rounding up)
_MAX_SPLITS = 64
_CPU_SM_COUNT = 4  # stands in for the SM count under the Triton interpreter (CPU tensors)
_COUNTERS = 1 << 14  # column blocks one launch may have (N / BLOCK_N); 16,384 x 64 columns at least


@dataclass(frozen=True)
class GemvConfig:
    """Tile sizes and launch width of the GEMV. block_k is capped by the group size (a tile lies
    in one group); programs_per_sm sets how far K is split when the columns alone are too few."""
    block_n: int
    block_k: int
    num_warps: int = 4
    programs_per_sm: int = 4
    ahead: int = 0  # tiles requested ahead of the one computed (0, 1 or 2)


# The fastest of `benchmarks/gpu_quant.py sweep` on an H200 at llama8b's four shapes (BENCHMARKS.md):
# one row, then a few (each row's products cost as much as the shared dequantization)
DEFAULT_CONFIG = GemvConfig(block_n=256, block_k=32, num_warps=4, programs_per_sm=8, ahead=2)
FEW_ROWS_CONFIG = GemvConfig(block_n=128, block_k=32, num_warps=4, programs_per_sm=4)


@triton.jit
def _weight_tile(qweight_ptr, k0, ks, k_end, words, word_mask, qweight_row_stride):
    """Packed weights [BLOCK_K, BLOCK_N / 8] of rows k0 + ks; rows at or past k_end read as 0."""
    k_mask = (k0 + ks) < k_end
    return tl.load(qweight_ptr + (k0 + ks).to(tl.int64)[:, None] * qweight_row_stride + words[None, :],
                   mask=k_mask[:, None] & word_mask[None, :], other=0, eviction_policy="evict_first")


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, partial_ptr, counter_ptr,
                       M, N, K, group_size, k_per_split, splits,
                       x_row_stride, qweight_row_stride, qzeros_row_stride, scales_row_stride, out_row_stride,
                       ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, AHEAD: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    words = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # [BLOCK_N / 8]
    cols = words[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BLOCK_N / 8, 8] output columns
    word_mask = words < N // 8
    rows = tl.arange(0, ROWS)  # [ROWS]
    row_mask = rows < M
    ks = tl.arange(0, BLOCK_K)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)  # this split's rows: [k_start, k_end)
    # software pipeline: the tile AHEAD iterations on is requested before this one is computed, so
    # a program keeps up to AHEAD + 1 tiles in flight (a packed tile costs BLOCK_K * BLOCK_N / 8 words
    # of registers; its unpacked floats, 8 times more, are what limit the programs per SM)
    tile = _weight_tile(qweight_ptr, k_start, ks, k_end, words, word_mask, qweight_row_stride)
    if AHEAD == 2:
        next_tile = _weight_tile(qweight_ptr, k_start + BLOCK_K, ks, k_end, words, word_mask, qweight_row_stride)
    acc = tl.zeros((ROWS, BLOCK_N // 8, 8), dtype=tl.float32)
    for kk in range(0, k_per_split, BLOCK_K):
        k0 = k_start + kk
        k_mask = (k0 + ks) < K  # the last split may run past K
        if AHEAD > 0:
            later = _weight_tile(qweight_ptr, k0 + AHEAD * BLOCK_K, ks, k_end, words, word_mask, qweight_row_stride)
        q = small_int_to_float(awq_unpack(tile))  # [BLOCK_K, BLOCK_N / 8, 8] from tile [BLOCK_K, BLOCK_N / 8]
        group = k0 // group_size
        in_range = word_mask & (k0 < K)
        zero_words = tl.load(qzeros_ptr + group * qzeros_row_stride + words, mask=in_range, other=0)
        zeros = awq_unpack(zero_words).to(tl.float32)  # [BLOCK_N / 8, 8]
        scales = tl.load(scales_ptr + group * scales_row_stride + cols, mask=in_range[:, None],
                         other=0.0).to(tl.float32)
        # one row at a time: a [ROWS, BLOCK_K, BLOCK_N] product would not fit in registers
        for r in tl.static_range(ROWS):
            x = tl.load(x_ptr + r * x_row_stride + k0 + ks, mask=k_mask & (r < M), other=0.0).to(tl.float32)
            xq = tl.sum(x[:, None, None] * q, axis=0)  # [BLOCK_N / 8, 8]
            row_acc = scales * (xq - zeros * tl.sum(x, axis=0))
            acc += tl.where((rows == r)[:, None, None], row_acc[None, :, :], 0.0)
        if AHEAD == 0:
            tile = _weight_tile(qweight_ptr, k0 + BLOCK_K, ks, k_end, words, word_mask, qweight_row_stride)
        elif AHEAD == 1:
            tile = later
        else:
            tile = next_tile
            next_tile = later
    out = out_ptr + rows.to(tl.int64)[:, None, None] * out_row_stride + cols[None, :, :]
    out_mask = row_mask[:, None, None] & word_mask[None, :, None]
    if splits == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # partials [splits, ROWS, N]: this split's share, then the column block's arrival count
        partial = partial_ptr + rows[:, None, None] * N + cols[None, :, :]
        tl.store(partial + split * ROWS * N, acc, mask=out_mask)
        tl.debug_barrier()  # every thread's partials are written before the arrival is published
        arrived = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel")  # one thread; orders the stores
        if arrived == splits - 1:  # the last split to arrive reduces, in split order
            total = tl.zeros((ROWS, BLOCK_N // 8, 8), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(partial + s * ROWS * N, mask=out_mask, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.atomic_xchg(counter_ptr + pid_n, 0)  # ready for the next launch


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


_counters: Dict[torch.device, torch.Tensor] = {}


def _arrival_counters(device: torch.device) -> torch.Tensor:
    """The device's zeroed arrival counters, made on first use. Made outside a CUDA graph capture (a
    buffer made inside one would belong to that graph's memory pool): the engine runs every layer
    eagerly before it captures."""
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("w4a16_gemv: run it once outside CUDA graph capture first (its arrival "
                               "counters are made on first use)")
        counters = _counters[device] = torch.zeros(_COUNTERS, dtype=torch.int32, device=device)
    return counters


def split_count(n: int, k: int, group_size: int, block_n: int, device: torch.device,
                programs_per_sm: int = DEFAULT_CONFIG.programs_per_sm) -> int:
    """How many K shares (of whole groups) give programs_per_sm programs per SM (1 when the column
    blocks alone do; the rows do not count: one program serves every row)."""
    programs = triton.cdiv(n, block_n)
    wanted = programs_per_sm * _sm_count(device)
    if programs >= wanted:
        return 1
    return max(1, min(triton.cdiv(wanted, programs), _MAX_SPLITS, k // group_size))


def w4a16_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, config: Optional[GemvConfig] = None) -> torch.Tensor:
    """x [M, K] @ dequantized W [K, N] -> new [M, N] in x's dtype, for M <= MAX_ROWS. Arguments as
    w4a16_gemm's. One launch, no host synchronization (CUDA-graph safe)."""
    config = config or (DEFAULT_CONFIG if x.shape[0] <= 1 else FEW_ROWS_CONFIG)
    block_k = k_tile(group_size, config.block_k)
    check_w4a16_args("w4a16_gemv", x, qweight, qzeros, scales, group_size, block_k)
    m, k = x.shape
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
    counters = _arrival_counters(x.device)
    if column_blocks > counters.numel():
        raise ValueError(f"w4a16_gemv: N={n} needs {column_blocks} column blocks, more than {counters.numel()}")
    partials = torch.empty((splits, rows, n) if splits > 1 else (1,), dtype=torch.float32, device=x.device)
    _w4a16_gemv_kernel[(column_blocks, splits)](
        x, qweight, qzeros, scales, out, partials, counters, m, n, k, group_size, groups_per_split * group_size,
        splits, x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
        ROWS=rows, BLOCK_N=block_n, BLOCK_K=block_k, AHEAD=config.ahead,
        num_warps=config.num_warps)
    return out
