"""Round-to-nearest quantizers of weight matrices W [out_features, in_features] (float32).

int4, group-wise along the input dim (G inputs share a scale and a zero point per output row):
    asymmetric  s = (max - min) / 15, z = clamp(round(-min / s), 0, 15)
    symmetric   s = max|w| / 7,       z = 8
    q = clamp(round(w / s) + z, 0, 15),  w ~ (q - z) * s
Scales are rounded to float16 before q is computed: the checkpoint stores them so, and q must be
the best integer for the scale the reader will use.
"""
from __future__ import annotations

from typing import Tuple

import torch

INT4_MAX = 15


def int4_scales(w: torch.Tensor, group: int, sym: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero), each [out, in / group] float32 (zero holds integers)."""
    out_f, in_f = w.shape
    wg = w.reshape(out_f, in_f // group, group)
    if sym:
        scale = (wg.abs().amax(-1) / 7).clamp(min=1e-5)
        zero = torch.full_like(scale, 8.0)
    else:
        hi, lo = wg.amax(-1), wg.amin(-1)
        scale = ((hi - lo) / INT4_MAX).clamp(min=1e-5)
        zero = None
    scale = scale.half().float()
    if zero is None:
        zero = (-(lo / scale).round()).clamp(0, INT4_MAX)
    return scale, zero


def quantize_int4(w: torch.Tensor, group: int, sym: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q [out, in] int32 in 0..15, scale [out, in / group], zero [out, in / group])."""
    scale, zero = int4_scales(w, group, sym)
    out_f, in_f = w.shape
    wg = w.reshape(out_f, in_f // group, group)
    q = (wg / scale.unsqueeze(-1)).round().add_(zero.unsqueeze(-1)).clamp_(0, INT4_MAX)
    return q.reshape(out_f, in_f).to(torch.int32), scale, zero


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int) -> torch.Tensor:
    out_f, in_f = q.shape
    qg = q.reshape(out_f, in_f // group, group).float()
    return ((qg - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).reshape(out_f, in_f)


def fake_quantize_int4(w: torch.Tensor, group: int, sym: bool) -> torch.Tensor:
    """W after an int4 round trip: what the quantized layer will multiply by. The searches call
    this thousands of times, so it takes the short way: clamp(round(w / s) + z, 0, 15) - z is
    clamp(round(w / s), -z, 15 - z)."""
    scale, zero = int4_scales(w, group, sym)
    out_f, in_f = w.shape
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    q = torch.div(w.reshape(out_f, in_f // group, group), s).round_()
    return torch.clamp(q, -z, INT4_MAX - z).mul_(s).reshape(out_f, in_f)
