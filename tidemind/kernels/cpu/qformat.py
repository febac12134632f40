"""Which of the kernels' packed formats holds a decoded quantized weight exactly.

Input: q int8 [N, K], d and m float32 [N, K / G] (w = d * q + m, G = 16 or 32; loader/gguf_blocks.py
decodes every GGUF type it keeps quantized into this form). Output: the same weight in the form
tm_repack (csrc/common.c) takes, chosen from the values themselves, never from a type name:

    4-bit  when every q lies in [0, 15] (Q4_1, Q4_K), or in [-8, 7] (Q4_0: stored as q + 8 with
           m - 8 d, exact since Q4_0 has m = 0), and d, m are equal over each pair of 16-groups
    8-bit  otherwise (Q8_0, Q5_*, Q6_K): q as is, group 32 where the pairs agree, else 16
    scales IEEE half when every d and m is a half exactly (the legacy types' scales), else float32
           (K-quants: a half times a 6-bit sub-block scale)

so the packed weight dequantizes to exactly the float32 values gguf-py's dequantization gives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QFormat:
    q: torch.Tensor  # int8 [N, K]: 4-bit values in [0, 15]
    d: torch.Tensor  # float32 [N, K / group]
    m: torch.Tensor  # float32 [N, K / group]
    bits: int  # 4 or 8
    group: int  # 32, or 16 (8-bit only)
    scale_f16: bool

    def describe(self) -> str:
        return describe_format(self.bits, self.group, self.scale_f16)

    def concat(self, other: "QFormat") -> "QFormat":
        """This weight's rows, then other's, in one format (both must describe() alike)."""
        if other.describe() != self.describe() or other.q.shape[1] != self.q.shape[1]:
            raise ValueError(f"cannot stack {self.describe()} and {other.describe()} rows")
        return QFormat(torch.cat([self.q, other.q]), torch.cat([self.d, other.d]), torch.cat([self.m, other.m]),
                       self.bits, self.group, self.scale_f16)


def describe_format(bits: int, group: int, scale_f16: bool) -> str:
    return f"{bits}-bit g{group} {'f16' if scale_f16 else 'f32'} scales"


def _halve_groups(x: torch.Tensor) -> torch.Tensor:
    return x[:, 0::2]


def _pairs_agree(x: torch.Tensor) -> bool:
    return x.shape[1] % 2 == 0 and torch.equal(x[:, 0::2], x[:, 1::2])


def _exact_in_half(x: torch.Tensor) -> bool:
    half = x.to(torch.float16)
    return bool(torch.isfinite(half).all()) and torch.equal(half.float(), x)


def choose_format(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> QFormat:
    n, k = q.shape
    if k % 32:
        raise ValueError(f"the CPU quantized kernels need a multiple of 32 inputs, got {k}")
    group = k // d.shape[1]
    if group not in (16, 32) or d.shape != m.shape or d.shape[0] != n:
        raise ValueError(f"quantized weight [{n}, {k}] with scales {tuple(d.shape)} and mins {tuple(m.shape)}: "
                         f"expected one (d, m) per 16 or 32 inputs of each row")
    d, m = d.float().contiguous(), m.float().contiguous()
    if group == 16 and _pairs_agree(d) and _pairs_agree(m):
        d, m, group = _halve_groups(d), _halve_groups(m), 32
    lo, hi = int(q.min()), int(q.max())
    if group == 32 and lo >= 0 and hi <= 15:
        bits = 4
    elif group == 32 and lo >= -8 and hi <= 7 and not m.any():
        q, m, bits = q + 8, -8.0 * d, 4  # exact: m was 0 and -8 d only changes d's exponent
    else:
        bits = 8
    scale_f16 = _exact_in_half(d) and _exact_in_half(m)
    return QFormat(q.contiguous(), d.contiguous(), m.contiguous(), bits, group, scale_f16)
