"""Torch definitions of the CPU quantized-linear kernels (csrc/qlinear.c), for tests and for
choosing a weight's packed format.

A quantized weight of N outputs and K inputs is w[n][k] = d[n][k / G] * q[n][k] + m[n][k / G]
(q integer, d and m float32, G inputs per group). Activations x [M, K] are quantized per row in
blocks of 32 inputs:

    xq[k] = rint(x[k] * (127 / amax)), clamped to [-127, 127]   amax = max |x| over the block
    dx[k / 32] = amax / 127        sx[k / 16] = dx * sum of xq over the 16 inputs

and the kernels return, per output, sum over groups g of (d_g dx_g sum_{k in g} q xq + m_g sx_g):
x @ w.T up to the rounding of x to xq (|x - dx xq| <= dx / 2 per input).
"""
from __future__ import annotations

from typing import Tuple

import torch

ABLOCK = 32  # inputs per activation block


def quantize_rows(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32, K a multiple of 32 -> (xq int8 [M, K], dx [M, K / 32], sx [M, K / 16])."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // ABLOCK, ABLOCK)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    xq = torch.round(blocks * inv).clamp_(-127, 127)
    dx = (amax / 127.0).reshape(m, k // ABLOCK)
    sums = xq.reshape(m, k // 16, 16).sum(dim=-1)  # exact: integers below 2^24
    sx = dx.repeat_interleave(2, dim=1) * sums
    return xq.to(torch.int8).reshape(m, k), dx, sx


def dequantize(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """w = d * q + m: q [N, K], d and m [N, K / G] -> float32 [N, K]."""
    group = q.shape[1] // d.shape[1]
    return d.float().repeat_interleave(group, dim=1) * q.float() + m.float().repeat_interleave(group, dim=1)


def qlinear_terms(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor, xq: torch.Tensor, dx: torch.Tensor,
                  sx: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y, scale) in float64: y [M, N] what the kernels compute, without their float32 rounding;
    scale [M, N] the sum of the terms' magnitudes, which bounds that rounding (tests' tolerance)."""
    n, k = q.shape
    rows, group = xq.shape[0], k // d.shape[1]
    isum = torch.einsum("mgk,ngk->mng", xq.double().reshape(rows, k // group, group),
                        q.double().reshape(n, k // group, group))  # [M, N, groups]
    dxg = dx.double().repeat_interleave(2, dim=1)[:, ::group // 16]  # dx of each group's first input
    sxg = sx.double().reshape(rows, k // group, group // 16).sum(dim=-1)
    scaled = isum * d.double()[None] * dxg[:, None, :]
    offset = m.double()[None] * sxg[:, None, :]
    return (scaled + offset).sum(dim=-1), (scaled.abs() + offset.abs()).sum(dim=-1)


def rounding_bound(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[M, N]: the most |x @ w.T - qlinear(x)| can be from rounding x to int8 blocks alone,
    sum_k |w[n][k]| dx[k / 32] / 2."""
    _, dx, _ = quantize_rows(x)
    return (dx.double().repeat_interleave(ABLOCK, dim=1) / 2) @ w.double().abs().t()
