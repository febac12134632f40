"""RMSNorm, alone and fused with the residual add, one program per row.

Reference: kernels/reference.py (rms_norm, add_rms_norm). Nothing in the package imports this
module at import time; the runner binds it once at start-up.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# A row is held in registers whole; past this it would spill (no model has a wider hidden size).
_MAX_HIDDEN = 65536


@triton.jit
def _rms_norm_kernel(x_ptr, x_row_stride, residual_ptr, residual_row_stride, weight_ptr, out_ptr, out_row_stride,
                     hidden, eps, weight_offset, HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0)  # [BLOCK] in the model dtype
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0)
        # the sum is rounded to the model dtype, as torch's x + residual is, before the norm reads it
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * residual_row_stride + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32) + weight_offset
    tl.store(out_ptr + row * out_row_stride + cols, (xf * rstd * weight).to(out_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2:
        raise ValueError(f"rms_norm: x must be [num_tokens, hidden], got shape {tuple(x.shape)}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"rms_norm: x dtype {x.dtype} is not one of {_DTYPES}")
    if x.stride(1) != 1:
        raise ValueError(f"rms_norm: x's last dim must be contiguous, got strides {x.stride()}")
    if weight.shape != (x.shape[1],) or not weight.is_contiguous():
        raise ValueError(f"rms_norm: weight must be a contiguous [{x.shape[1]}], got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"rms_norm: weight is on {weight.device}, x on {x.device}")
    if x.shape[1] > _MAX_HIDDEN:
        raise ValueError(f"rms_norm: hidden size {x.shape[1]} is over the supported {_MAX_HIDDEN}")


def _launch(x: torch.Tensor, residual, weight: torch.Tensor, out: torch.Tensor, eps: float,
            weight_offset: float) -> None:
    num_tokens, hidden = x.shape
    if num_tokens == 0:
        return
    block = triton.next_power_of_2(hidden)
    num_warps = 4 if block <= 1024 else (8 if block <= 8192 else 16)
    has_residual = residual is not None
    _rms_norm_kernel[(num_tokens,)](
        x, x.stride(0), residual if has_residual else x, residual.stride(0) if has_residual else 0,
        weight, out, out.stride(0), hidden, float(eps), float(weight_offset),
        HAS_RESIDUAL=has_residual, BLOCK=block, num_warps=num_warps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * (weight + weight_offset), in float32, returned in x's dtype.

    x: [num_tokens, hidden] (last dim contiguous, any row stride); weight: [hidden], any float dtype.
    Returns a new contiguous [num_tokens, hidden].
    """
    _check(x, weight)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _launch(x, None, weight, out, eps, weight_offset)
    return out


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 weight_offset: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum rounded to x's dtype before the norm.

    IN PLACE: the sum is written into `residual` and the normed rows into `x`, and those two tensors
    are returned as (normed, summed); callers must not reuse their inputs. x, residual:
    [num_tokens, hidden] of one dtype, last dim contiguous.
    """
    _check(x, weight)
    if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
        raise ValueError(f"add_rms_norm: residual {tuple(residual.shape)} {residual.dtype} on {residual.device} "
                         f"must match x {tuple(x.shape)} {x.dtype} on {x.device}")
    if residual.stride(1) != 1:
        raise ValueError(f"add_rms_norm: residual's last dim must be contiguous, got strides {residual.stride()}")
    _launch(x, residual, weight, x, eps, weight_offset)
    return x, residual
