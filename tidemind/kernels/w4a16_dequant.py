"""W4A16 weights dequantized to a dense matrix on the GPU, for prefill-sized matmuls: from a few
hundred rows up, one pass over the weight (reading 0.5 bytes and writing 2 per weight) costs less
than the time a fused kernel loses to cuBLAS, so the AWQ method dequantizes, then calls matmul.

Grid (cdiv(K, BLOCK_K), cdiv(N, BLOCK_N)); each program writes a [BLOCK_K, BLOCK_N] tile of
W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n], BLOCK_K dividing G so the tile lies in one
group (layouts: kernels/w4a16_layout.py). Reference: awq_dequantize (layers/quantization/awq.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w4a16_layout import (BIASED_BITS, PACK, SLAB, awq_column_values, awq_unpack, awq_unpack_biased,
                           k_tile, slab_tile, unbiasing_offsets)

_BLOCK_K = 32
_BLOCK_N = 256


@triton.jit
def _w4a16_dequant_kernel(qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, N, group_size, biased_bits,
                            qweight_row_stride, qzeros_row_stride, scales_row_stride, out_row_stride,
                            BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, SLABS: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    words = tl.program_id(1) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # [BLOCK_N / 8]
    word_mask = words < N // 8
    ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)  # [BLOCK_K]; K is a multiple of BLOCK_K
    if SLABS:  # slabs [K / 32, N, 4] (kernels/w4a16_layout.py): the tile transposed, W^T [BLOCK_N, BLOCK_K]
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        group = k0 // group_size
        zeros = awq_column_values(tl.load(qzeros_ptr + group * qzeros_row_stride + cols // 8, mask=col_mask, other=0),
                                    cols)
        scales = tl.load(scales_ptr + group * scales_row_stride + cols, mask=col_mask, other=0.0).to(tl.float32)
        w_t = slab_tile(qweight_ptr, k0, cols, col_mask, N, biased_bits, BLOCK_K) * scales[:, None] \
            + unbiasing_offsets(zeros, scales)[:, None]
        tl.store(out_ptr + ks[None, :] * out_row_stride + cols[:, None], w_t.to(out_ptr.dtype.element_ty),
                 mask=col_mask[:, None])
        return
    packed = tl.load(qweight_ptr + ks[:, None] * qweight_row_stride + words[None, :], mask=word_mask[None, :],
                     other=0)  # [BLOCK_K, BLOCK_N / 8]
    biased = awq_unpack_biased(packed, biased_bits)  # [BLOCK_K, BLOCK_N / 8, 8] float32 128 + q
    group = k0 // group_size
    zero_words = tl.load(qzeros_ptr + group * qzeros_row_stride + words, mask=word_mask, other=0)
    cols = words[:, None] * 8 + tl.arange(0, 8)[None, :]  # [BLOCK_N / 8, 8]
    scales = tl.load(scales_ptr + group * scales_row_stride + cols, mask=word_mask[:, None], other=0.0).to(tl.float32)
    offsets = unbiasing_offsets(awq_unpack(zero_words), scales)  # [BLOCK_N / 8, 8]
    w = biased * scales[None, :, :] + offsets[None, :, :]  # (q - z) * s, one multiply-add
    tl.store(out_ptr + ks[:, None, None] * out_row_stride + cols[None, :, :], w.to(out_ptr.dtype.element_ty),
             mask=word_mask[None, :, None])


def w4a16_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                     dtype: torch.dtype) -> torch.Tensor:
    """The dense W [K, N] in `dtype` of AWQ-layout tensors (as awq_dequantize, computed in float32
    and rounded once). qweight [K, N / 8] int32 or its slabs [K / 32, N, 4] (kernels/
    w4a16_layout.py), qzeros [K / G, N / 8] int32, scales [K / G, N]."""
    slabs = qweight.dim() == 3
    k, n = (qweight.shape[0] * SLAB, qweight.shape[1]) if slabs else (qweight.shape[0], qweight.shape[1] * PACK)
    block_k = k_tile(group_size, _BLOCK_K)
    if group_size <= 0 or k % group_size or group_size % block_k:
        raise ValueError(f"w4a16_dequantize: group size {group_size} must divide K={k} and be a multiple of "
                           f"{block_k}")
    if tuple(qzeros.shape) != (k // group_size, n // PACK) or tuple(scales.shape) != (k // group_size, n):
        raise ValueError(f"w4a16_dequantize: qzeros {tuple(qzeros.shape)} and scales {tuple(scales.shape)} do not "
                           f"match qweight {tuple(qweight.shape)} with group size {group_size}")
    if not (qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()):
        raise ValueError("w4a16_dequantize: qweight, qzeros and scales must be contiguous")
    out = torch.empty((k, n), dtype=dtype, device=qweight.device)
    block_n = min(_BLOCK_N, max(64, triton.next_power_of_2(n)))
    grid = (k // block_k, triton.cdiv(n, block_n))
    _w4a16_dequant_kernel[grid](qweight, qzeros, scales, out, n, group_size, BIASED_BITS, qweight.stride(0),
                                  qzeros.stride(0), scales.stride(0), out.stride(0), BLOCK_K=block_k, BLOCK_N=block_n,
                                  SLABS=slabs, num_warps=4)
    return out
