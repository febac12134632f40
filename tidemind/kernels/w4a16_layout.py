"""The W4A16 weight layouts and what every W4A16 kernel shares about them: the nibble unpacking
(jit helpers), the argument checks, and the repacking of AutoAWQ's layout into K slabs.

    AutoAWQ ("gemm")   qweight [K, N / 8] int32: word j of row k holds columns 8j .. 8j + 7, column
                       8j + c in nibble AWQ_ORDER^-1[c] (awq_nibble_shifts); qzeros [K / G, N / 8]
                       packed the same way; scales [K / G, N]
    K slabs            qweight [K / 32, N, 4] int32: slab t, column n: the 32 values of rows
                       k = 32t .. 32t + 31, word j holding k = 32t + 8j + i at the nibble AutoAWQ
                       gives column i (so awq_unpack_biased yields them in k order); qzeros and
                       scales as AutoAWQ's. Made at load time (awq_to_slabs) where the Triton
                       kernels run: a GEMV thread reads a column's 32 rows in one 16-byte load
                       (kernels/w4a16_gemv_slabs.py)

The kernels: w4a16_gemv.py (AutoAWQ's layout, a few rows), w4a16_gemv_slabs.py (slabs, a few rows),
w4a16_gemm.py and w4a16_dequant.py (either layout).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..layers.quantization.packing import pack_awq, unpack_awq

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
PACK = 8
# K slabs: qweight [K / SLAB, N, SLAB_WORDS], a column's SLAB values of a slab in SLAB_WORDS words
SLAB = 32
SLAB_WORDS = SLAB // PACK
KERNEL_SLAB_WORDS = tl.constexpr(SLAB_WORDS)  # the same, readable inside the kernels


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
    [K / 32, N, 4] (the module docstring: word j of column n in slab t holds k = 32t + 8j + i, in the
    order awq_unpack_biased gives); k0 a multiple of BLOCK_K >= 8."""
    kw = k0 // 8 + tl.arange(0, BLOCK_K // 8)  # packed words along K
    words = tl.load(slabs_ptr + (kw // KERNEL_SLAB_WORDS).to(tl.int64)[None, :] * N * KERNEL_SLAB_WORDS
                    + cols[:, None] * KERNEL_SLAB_WORDS + (kw % KERNEL_SLAB_WORDS)[None, :],
                    mask=col_mask[:, None], other=0)  # [BLOCK_N, BLOCK_K / 8]
    return tl.reshape(awq_unpack_biased(words, biased_bits), (cols.shape[0], BLOCK_K))


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


_REPACK_WORDS = 512  # packed columns (4,096 outputs) repacked at a time: bounds the transient int64 copies


def awq_to_slabs(qweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's qweight [K, N / 8] -> slabs [K / 32, N, 4] (see the module docstring); K a multiple
    of 32. Runs on qweight's device, a few thousand columns at a time (the unpacked values take 12
    bytes a weight while they exist)."""
    k = qweight.shape[0]
    if k % SLAB:
        raise ValueError(f"awq_to_slabs: K={k} is not a multiple of {SLAB}")
    slabs = torch.empty((k // SLAB, qweight.shape[1] * 8, SLAB_WORDS), dtype=torch.int32, device=qweight.device)
    for start in range(0, qweight.shape[1], _REPACK_WORDS):
        part = qweight[:, start:start + _REPACK_WORDS]
        along_k = pack_awq(unpack_awq(part).t())  # [n, K / 8]: word (n, w) holds k = 8w + i as AWQ holds column i
        slabs[:, start * 8:(start + part.shape[1]) * 8] = along_k.view(-1, k // SLAB, SLAB_WORDS).transpose(0, 1)
    return slabs


def slabs_to_awq(slabs: torch.Tensor) -> torch.Tensor:
    """The inverse of awq_to_slabs: [K / 32, N, 4] -> AutoAWQ's [K, N / 8]."""
    n = slabs.shape[1]
    along_k = slabs.transpose(0, 1).reshape(n, -1)  # [N, K / 8]
    return pack_awq(unpack_awq(along_k).t())


def slabs_usable(k: int, group_size: int) -> bool:
    """Whether a layer of K inputs and this group size can run on slabs (a slab lies in one group)."""
    return k % SLAB == 0 and group_size % SLAB == 0
