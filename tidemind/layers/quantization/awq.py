"""AWQ W4A16: group-wise int4 weights in AutoAWQ's "gemm" layout, activations in the model dtype.

Per linear layer (K = in_features, N = out_features, G = group_size):
    qweight [K, N / 8]  int32, 8 int4 values per word along N in AWQ_ORDER (packing.py)
    qzeros  [K / G, N / 8] int32, packed the same way
    scales  [K / G, N]  float16
    W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n];  y = x @ W (+ bias)
The same runtime layout serves GPTQ checkpoints (gptq.py repacks them into it at load time).

On a CUDA device with Triton, qweight is repacked at load into K slabs (USE_SLABS) and the matmul
dequantizes in registers (kernels/w4a16_gemv_slabs.py for a few rows, kernels/w4a16_gemm.py up to
SLAB_DEQUANT_MIN_ROWS, DEQUANT_MIN_ROWS for layers left in AutoAWQ's layout) or, from there on,
dequantizes the weight with kernels/w4a16_dequant.py and calls matmul; elsewhere it dequantizes in
torch, then matmuls.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..linear import LinearMethod, ParamLayout, add_param
from .base import QuantizationConfig, read_field, require
from .packing import unpack_awq

logger = logging.getLogger("tidemind")

PACK = 8  # int4 values per int32 word
# Rows up to the GEMV's MAX_ROWS take the GEMV kernel (decode); more take the tiled GEMM; from
# DEQUANT_MIN_ROWS on, the weight is dequantized and cuBLAS multiplies (benchmarks/gpu_quant.py
# sweep on an H200: at 256 rows dequantize + cuBLAS took 0.71-0.78x the fused GEMM's best time).
DEQUANT_MIN_ROWS = 256
# On K slabs dequantizing (0.5 byte read, 2 written a weight, 2 read back by cuBLAS) costs ~130 us a
# llama8b layer whatever the rows. With K split (kernels/split_k.py) the fused GEMM beats it at 16
# rows (135.8 us a layer against bf16 cuBLAS's 124.0) and 64 (191.8 against 275.2), and loses at 256
# (451.9 against 346.2): BENCHMARKS.md, 2026-11-29 fifth session. Between 64 and 256 is unmeasured.
SLAB_DEQUANT_MIN_ROWS = 65
# Where the Triton kernels run, qweight is repacked at load into K slabs [K / 32, N, 4] (kernels/
# w4a16_gemv_slabs.py: a thread sums a column's 32 values in registers), where K and the group size
# allow; False keeps AutoAWQ's [K, N / 8] as loaded.
USE_SLABS = True


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
                   dtype: torch.dtype) -> torch.Tensor:
    """The dense W [K, N] (in `dtype`) of AWQ-layout tensors; computed in float32."""
    q = unpack_awq(qweight)  # [K, N]
    k, n = q.shape
    z = unpack_awq(qzeros)  # [K / G, N]
    grouped = q.view(k // group_size, group_size, n) - z.unsqueeze(1)  # [K / G, G, N]
    return (grouped.float() * scales.float().unsqueeze(1)).view(k, n).to(dtype)


def triton_usable(device: torch.device, group_size: int) -> bool:
    """Whether the W4A16 Triton kernels can run here: CUDA, Triton installed, and a group size
    the kernels' K tiles (multiples of 16 dividing the group) fit."""
    if device.type != "cuda" or group_size % 16:
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int, use_triton: bool) -> torch.Tensor:
    """x [M, K] @ W [K, N] -> [M, N] in x's dtype, W in AWQ layout (qweight [K, N / 8]) or, where
    the Triton kernels run, in K slabs (qweight [K / 32, N, 4], see USE_SLABS)."""
    if not use_triton:
        return x @ awq_dequantize(qweight, qzeros, scales, group_size, x.dtype)
    from ...kernels.w4a16_gemv import MAX_ROWS, w4a16_gemv

    if x.shape[0] <= MAX_ROWS:
        if qweight.dim() == 3:
            from ...kernels.w4a16_gemv_slabs import w4a16_gemv_slabs

            return w4a16_gemv_slabs(x, qweight, qzeros, scales, group_size)
        return w4a16_gemv(x, qweight, qzeros, scales, group_size)
    if x.shape[0] >= (SLAB_DEQUANT_MIN_ROWS if qweight.dim() == 3 else DEQUANT_MIN_ROWS):
        from ...kernels.w4a16_dequant import w4a16_dequantize

        return x @ w4a16_dequantize(qweight, qzeros, scales, group_size, x.dtype)
    from ...kernels.w4a16_gemm import w4a16_gemm

    return w4a16_gemm(x, qweight, qzeros, scales, group_size)


def check_group_shapes(prefix: str, input_size: int, output_sizes: Sequence[int], group_size: int,
                       per_word: int = PACK) -> None:
    """Group-wise packed layouts need groups that tile the input features and every merged
    projection's outputs in whole words of `per_word` values."""
    require(input_size % group_size == 0,
            f"{prefix}: group size {group_size} does not divide the layer's {input_size} input features; "
            f"quantize with a group size that divides every layer's width (e.g. --w-group-size 64 or 32)")
    for size in output_sizes:
        require(size % per_word == 0, f"{prefix}: {size} output features are not a multiple of {per_word}, which "
                                      f"packing {per_word} values per int32 word needs")


class W4A16Runtime(LinearMethod):
    """apply / process shared by AWQ and (repacked) GPTQ: the AWQ-layout tensors qweight,
    qzeros, scales on the layer and `layer.group_size`."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        layer.use_triton = triton_usable(layer.qweight.device, layer.group_size)
        if layer.use_triton and USE_SLABS:
            from ...kernels.w4a16_layout import awq_to_slabs, slabs_usable

            if slabs_usable(layer.qweight.shape[0], layer.group_size):
                layer.qweight = nn.Parameter(awq_to_slabs(layer.qweight.data), requires_grad=False)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out = w4a16_matmul(x2, layer.qweight, layer.qzeros, layer.scales, layer.group_size,
                           getattr(layer, "use_triton", False))
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])


class AWQLinearMethod(W4A16Runtime):
    def __init__(self, config: "AWQConfig", prefix: str):
        self.config = config
        self.prefix = prefix

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int]) -> None:
        group = self.config.group_size if self.config.group_size > 0 else input_size
        check_group_shapes(self.prefix, input_size, output_sizes, group)
        output_size = sum(output_sizes)
        packed = ParamLayout(output_dim=1, input_dim=0, packed_dim=1, pack_factor=PACK, dtype=torch.int32)
        add_param(layer, "qweight", (input_size, output_size // PACK), packed)
        add_param(layer, "qzeros", (input_size // group, output_size // PACK), packed)
        add_param(layer, "scales", (input_size // group, output_size),
                  ParamLayout(output_dim=1, input_dim=0, dtype=torch.float16))
        layer.group_size = group


@dataclass(frozen=True)
class AWQConfig(QuantizationConfig):
    name = "awq"
    bits: int = 4
    group_size: int = 128  # -1: one group per input row's full width
    zero_point: bool = True
    version: str = "gemm"

    @classmethod
    def from_hf(cls, quantization_config: dict) -> "AWQConfig":
        qc = quantization_config
        bits = int(read_field(qc, "bits", "w_bit", default=4))
        group = int(read_field(qc, "group_size", "q_group_size", default=128))
        version = str(read_field(qc, "version", default="gemm")).lower()
        zero_point = bool(read_field(qc, "zero_point", default=True))
        require(bits == 4, f"AWQ with bits={bits}: tidemind runs 4-bit AWQ only")
        require(version == "gemm", f"AWQ version {version!r}: tidemind reads AutoAWQ's \"gemm\" layout only "
                                   f"(re-export the model with version=\"gemm\")")
        require(zero_point, "AWQ with zero_point=false: tidemind reads AWQ checkpoints with zero points (qzeros) "
                            "only; a symmetric model stores zeros of 8")
        require(group == -1 or group > 0, f"AWQ group_size={group} must be positive (or -1 for whole rows)")
        skip = tuple(read_field(qc, "modules_to_not_convert", default=()) or ())
        return cls(modules_to_not_convert=skip, bits=bits, group_size=group, zero_point=zero_point,
                   version=version)

    def to_hf(self) -> dict:
        return {"quant_method": "awq", "bits": self.bits, "group_size": self.group_size,
                "zero_point": self.zero_point, "version": self.version,
                "modules_to_not_convert": list(self.modules_to_not_convert) or None}

    def quantized_method(self, prefix: str) -> LinearMethod:
        return AWQLinearMethod(self, prefix)

    def describe(self) -> str:
        return f"awq int{self.bits} g{self.group_size}"
