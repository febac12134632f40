"""SmoothQuant W8A8: int8 weights (one scale per output channel), int8 activations quantized per
token at run time, an int8 x int8 -> int32 matmul. The checkpoint layout is LMDeploy's
(`quant_method: smooth_quant`); the smoothing itself (folding activation outliers into the
preceding norm's weight) happened when the checkpoint was made (tidemind lite smooth_quant), so
nothing here knows about it.

Per linear layer (K = in_features, N = out_features):
    weight [N, K]  int8,   W[n, k] = weight[n, k] * scale[n]
    scale  [N, 1]  float32
    y[m, n] = (sum_k xq[m, k] * weight[n, k]) * x_scale[m] * scale[n]   (+ bias)
with xq = round(x / x_scale), x_scale[m] = max_k |x[m, k]| / 127.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from ..linear import LinearMethod, ParamLayout, add_param
from .base import QuantizationConfig, read_field, require

INT8_MAX = 127
# cuBLASLt's int8 GEMM (torch._int_mm on CUDA) wants more than 16 rows and K, N multiples of 8.
_CUDA_INT_MM_MIN_ROWS = 17


def quantize_per_token(x: torch.Tensor, reduce_absmax=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (int8 [M, K], float32 scales [M, 1]); a zero row gets scale 1 (all zeros).
    reduce_absmax: turns the rows' absmax [M, 1] over x into the absmax over the whole row, when x is
    one tensor-parallel rank's slice of it (Linear.reduce_input_max), so every rank scales as tp 1 does."""
    xf = x.float()
    absmax = xf.abs().amax(dim=-1, keepdim=True)
    if reduce_absmax is not None:
        absmax = reduce_absmax(absmax)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    return (xf / scale).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_per_channel(weight: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] float -> (int8 [N, K], float32 scales [N, 1]): symmetric, one scale per output row."""
    return quantize_per_token(weight)


def int8_matmul(x_q: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x_q [M, K] int8 @ weight [N, K] int8 .T -> int32 [M, N]."""
    m, k = x_q.shape
    n = weight.shape[0]
    if x_q.is_cuda:
        if k % 8 or n % 8:
            # no int8 GEMM for these shapes: exact float32 sums up to K = 1040, rounding beyond
            return (x_q.float() @ weight.float().t()).round_().to(torch.int32)
        if m < _CUDA_INT_MM_MIN_ROWS:
            padded = x_q.new_zeros((_CUDA_INT_MM_MIN_ROWS, k))
            padded[:m] = x_q
            return torch._int_mm(padded, weight.t())[:m]
    return torch._int_mm(x_q, weight.t())


class W8A8LinearMethod(LinearMethod):
    def __init__(self, config: "SmoothQuantConfig", prefix: str):
        self.config = config
        self.prefix = prefix

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int]) -> None:
        output_size = sum(output_sizes)
        add_param(layer, "weight", (output_size, input_size), ParamLayout(output_dim=0, input_dim=1, dtype=torch.int8))
        add_param(layer, "scale", (output_size, 1), ParamLayout(output_dim=0, dtype=torch.float32))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        x_q, x_scale = quantize_per_token(x2, getattr(layer, "reduce_input_max", None))
        acc = int8_matmul(x_q, layer.weight)  # [M, N] int32
        out = (acc.float() * x_scale * layer.scale.view(1, -1)).to(x.dtype)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


@dataclass(frozen=True)
class SmoothQuantConfig(QuantizationConfig):
    name = "smooth_quant"
    quant_dtype: str = "int8"

    @classmethod
    def from_hf(cls, quantization_config: dict) -> "SmoothQuantConfig":
        qc = quantization_config
        quant_dtype = str(read_field(qc, "quant_dtype", default="int8")).lower()
        require(quant_dtype == "int8", f"smooth_quant with quant_dtype={quant_dtype!r}: tidemind runs int8 W8A8 only")
        bits = int(read_field(qc, "bits", default=8))
        require(bits == 8, f"smooth_quant with bits={bits}: tidemind runs 8-bit weights only")
        skip = tuple(read_field(qc, "modules_to_not_convert", default=()) or ())
        return cls(modules_to_not_convert=skip, quant_dtype=quant_dtype)

    def to_hf(self) -> dict:
        out = {"quant_method": "smooth_quant", "quant_dtype": self.quant_dtype, "bits": 8}
        if self.modules_to_not_convert:
            out["modules_to_not_convert"] = list(self.modules_to_not_convert)
        return out

    def quantized_method(self, prefix: str) -> LinearMethod:
        return W8A8LinearMethod(self, prefix)

    def describe(self) -> str:
        return "smooth_quant w8a8 int8"
