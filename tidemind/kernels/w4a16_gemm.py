"""W4A16 GEMM for a few to a few hundred rows: x [M, K] (float) @ W [K, N] with W in AutoAWQ's GEMM
layout (layers/quantization/awq.py) or its K slabs (kernels/w4a16_gemv_slabs.py), dequantized tile by
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

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PACK = 8
# K slabs (kernels/w4a16_gemv_slabs.py): qweight [K / SLAB, N, SLAB_WORDS], a column's SLAB values of a
# slab in SLAB_WORDS consecutive words
SLAB = 32
SLAB_WORDS = SLAB // PACK
KERNEL_SLAB_WORDS = tl.constexpr(SLAB_WORDS)  # the same, readable inside the kernels


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
def awq_nibble_shifts():
    """[8] bit offsets of columns 8j + 0 .. 8j + 7 inside word j: AutoAWQ stores column c in
    nibble (0, 4, 1, 5, 2, 6, 3, 7)[c], the inverse of its packing order (0, 2, 4, 6, 1, 3, 5, 7)."""
    c = tl.arange(0, 8)
    return ((c % 2) * 4 + c // 2) * 4


@triton.jit
def awq_column_values(words, cols):
    """Column cols' int4 values out of the packed words holding them (words[i] holds cols[i] // 8's
    eight columns, AutoAWQ's order): the zero points of single columns."""
    return (words >> ((cols % 2 * 4 + cols % 8 // 2) * 4)) & 0xF


@triton.jit
def awq_unpack(words):
    """int32 words [..., W] -> their int4 values [..., W, 8] in column order (nibble of column 8j + c
    of word j at bits awq_nibble_shifts()[c]), int32."""
    return (tl.expand_dims(words, len(words.shape)) >> awq_nibble_shifts()) & 0xF


_UNPACK_BIAS = tl.constexpr(128.0)  # what awq_unpack_biased adds to each value
# float32 bits of 128.0: with a nibble q at bits 16..19 (its mantissa's units) it reads as 128 + q
BIASED_BITS = 0x43000000


@triton.jit
def _nibble_as_float(words, right: tl.constexpr, left: tl.constexpr, biased_bits):
    """The nibble at bit `right - left` of each word moved to bits 16..19 -> float32 128 + q."""
    at_16 = (words.to(tl.uint32, bitcast=True) >> right) << left  # logical: no sign to carry
    return ((at_16 & 0x000F0000) | biased_bits.to(tl.uint32, bitcast=True)).to(tl.float32, bitcast=True)


@triton.jit
def awq_unpack_biased(words, biased_bits):
    """int32 words [..., W] -> float32 [..., W, 8]: 128 + q of each column, in column order, exact.

    AutoAWQ's order puts columns 2i and 2i + 1 at bits 4i and 16 + 4i: the odd column needs one
    shift (none for i = 0), the even one a second (lift to bit 16), and each one logic op (mask, OR
    in 128.0's bits, passed as biased_bits = BIASED_BITS at run time so that the compiler keeps it in
    a register and makes the two one instruction): about two integer instructions a weight and no
    conversion. The eight columns are joined with each word's eight values in one thread (no
    exchange between threads). unbiasing_offsets gives the offset that removes the bias."""
    c0 = _nibble_as_float(words, 0, 16, biased_bits)
    c1 = _nibble_as_float(words, 0, 0, biased_bits)
    c2 = _nibble_as_float(words, 4, 16, biased_bits)
    c3 = _nibble_as_float(words, 4, 0, biased_bits)
    c4 = _nibble_as_float(words, 8, 16, biased_bits)
    c5 = _nibble_as_float(words, 8, 0, biased_bits)
    c6 = _nibble_as_float(words, 12, 16, biased_bits)
    c7 = _nibble_as_float(words, 12, 0, biased_bits)
    # join(a, b)[..., j] picks a (j = 0) or b: the three levels index columns 4i + 2j + k
    evens = tl.join(tl.join(c0, c4), tl.join(c2, c6))
    odds = tl.join(tl.join(c1, c5), tl.join(c3, c7))
    return tl.reshape(tl.join(evens, odds), words.shape + (8,))


@triton.jit
def unbiasing_offsets(zeros, scales):
    """-(128 + z) * s, float32, for int zero points and float32 scales of one shape: with it, the
    weight of a biased code is one multiply-add, (128 + q) * s + offset = (q - z) * s."""
    return -(zeros.to(tl.float32) + _UNPACK_BIAS) * scales


@triton.jit
def slab_tile(slabs_ptr, k0, cols, col_mask, N, biased_bits, BLOCK_K: tl.constexpr):
    """128 + q of rows k0 .. k0 + BLOCK_K of columns cols as float32 [BLOCK_N, BLOCK_K], from slabs
    [K / 32, N, 4] (kernels/w4a16_gemv_slabs.py: word j of column n in slab t holds k = 32t + 8j + i,
    in the order awq_unpack_biased gives); k0 a multiple of BLOCK_K >= 8."""
    kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # packed words along K
    words = tl.load(slabs_ptr + (kw // KERNEL_SLAB_WORDS).to(tl.int64)[None, :] * N * KERNEL_SLAB_WORDS
                    + cols[:, None] * KERNEL_SLAB_WORDS + (kw % KERNEL_SLAB_WORDS)[None, :],
                    mask=col_mask[:, None], other=0)  # [BLOCK_N, BLOCK_K / 8]
    return tl.reshape(awq_unpack_biased(words, biased_bits), (cols.shape[0], BLOCK_K))


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
        if SLABS:  # W^T [BLOCK_N, BLOCK_K] from slabs (kernels/w4a16_gemv_slabs.py), transposed
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


def check_w4a16_args(name: str, x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                     scales: torch.Tensor, group_size: int, block_k: int) -> None:
    """Shape, dtype and device checks shared by the W4A16 launchers (host values only)."""
    if x.dim() != 2 or x.dtype not in _DTYPES or x.stride(1) != 1:
        raise ValueError(f"{name}: x must be a [M, K] float tensor with a contiguous last dim, got "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")
    k = x.shape[1]
    slabs = qweight.dim() == 3
    n = qweight.shape[1] if slabs else qweight.shape[1] * PACK
    rows_ok = qweight.shape[0] * SLAB == k and qweight.shape[2] == SLAB_WORDS if slabs else qweight.shape[0] == k
    if not rows_ok or qweight.dtype != torch.int32 or not qweight.is_contiguous():
        raise ValueError(f"{name}: qweight must be a contiguous int32 [{k}, N / 8] (or its slabs [{k // SLAB}, N, "
                         f"{SLAB_WORDS}]), got {tuple(qweight.shape)} {qweight.dtype}")
    if slabs and group_size % SLAB:
        raise ValueError(f"{name}: slabs need a group size that is a multiple of {SLAB}, got {group_size}")
    if group_size <= 0 or k % group_size or group_size % block_k:
        raise ValueError(f"{name}: group size {group_size} must divide K={k} and be a multiple of {block_k}")
    groups = k // group_size
    if tuple(qzeros.shape) != (groups, n // PACK) or qzeros.dtype != torch.int32 or not qzeros.is_contiguous():
        raise ValueError(f"{name}: qzeros must be a contiguous int32 [{groups}, {n // PACK}], got "
                         f"{tuple(qzeros.shape)} {qzeros.dtype}")
    if tuple(scales.shape) != (groups, n) or not scales.is_contiguous():
        raise ValueError(f"{name}: scales must be a contiguous [{groups}, {n}], got {tuple(scales.shape)}")
    if not (x.device == qweight.device == qzeros.device == scales.device):
        raise ValueError(f"{name}: x, qweight, qzeros and scales must be on one device")


def k_tile(group_size: int, largest: int) -> int:
    """The largest power of two <= `largest` dividing the group size (>= 16 for tl.dot)."""
    tile = largest
    while tile > 16 and group_size % tile:
        tile //= 2
    return tile


def w4a16_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, config: Optional[GemmConfig] = None) -> torch.Tensor:
    """x [M, K] @ dequantized W [K, N] -> new [M, N] in x's dtype.

    qweight [K, N / 8] int32 or its slabs [K / 32, N, 4] (kernels/w4a16_gemv_slabs.py), qzeros
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
