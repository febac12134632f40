"""Gated MLP activations: act(gate) * up for gate_up = [gate | up] along the last dim.

Reference: kernels/reference.py (silu_and_mul, gelu_tanh_and_mul). The kernel computes in float32
and rounds once to the input dtype; the reference computes in the input dtype, so in bfloat16 /
float16 the two differ by a rounding or two of that dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024  # columns per program; a row of d columns takes cdiv(d, _BLOCK) programs


@triton.jit
def _act_and_mul_kernel(gate_up_ptr, gate_up_row_stride, out_ptr, out_row_stride, d,
                        ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate_ptrs = gate_up_ptr + row * gate_up_row_stride + cols  # up sits d columns to the right
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_ptrs + d, mask=mask, other=0.0).to(tl.float32)
    # exponentials of -|x| only: they never overflow, whatever the sign of x
    if ACTIVATION == "silu":
        e = tl.exp(-tl.abs(gate))
        sigmoid = tl.where(gate >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        act = gate * sigmoid
    else:
        # gelu, tanh approximation: 0.5 * g * (1 + tanh(sqrt(2 / pi) * (g + 0.044715 * g^3)))
        inner = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        e = tl.exp(-2.0 * tl.abs(inner))
        tanh_abs = (1.0 - e) / (1.0 + e)
        act = 0.5 * gate * (1.0 + tl.where(inner >= 0, tanh_abs, -tanh_abs))
    tl.store(out_ptr + row * out_row_stride + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _act_and_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"{activation}_and_mul: gate_up must be [n, 2 * d], got shape {tuple(gate_up.shape)}")
    if gate_up.dtype not in _DTYPES:
        raise ValueError(f"{activation}_and_mul: dtype {gate_up.dtype} is not one of {_DTYPES}")
    if gate_up.stride(1) != 1:
        raise ValueError(f"{activation}_and_mul: gate_up's last dim must be contiguous, got strides "
                         f"{gate_up.stride()}")
    n, d = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((n, d), dtype=gate_up.dtype, device=gate_up.device)
    if n and d:
        block = min(_BLOCK, triton.next_power_of_2(d))
        _act_and_mul_kernel[(n, triton.cdiv(d, block))](gate_up, gate_up.stride(0), out, out.stride(0), d,
                                                       ACTIVATION=activation, BLOCK=block, num_warps=4)
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up: [n, 2 * d] (last dim contiguous) -> new [n, d] in gate_up's dtype."""
    return _act_and_mul(gate_up, "silu")


def gelu_tanh_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gelu_tanh(gate) * up: [n, 2 * d] (last dim contiguous) -> new [n, d] in gate_up's dtype."""
    return _act_and_mul(gate_up, "gelu_tanh")
