"""GPTQ checkpoints (AutoGPTQ / optimum / GPTQModel layout), 4 or 8 bits, any group size, with or
without act-order.

Per linear layer (K = in_features, N = out_features, G = group_size, P = 32 / bits values a word):
    qweight [K / P, N]  int32, packed along the INPUT dim in order (packing.py)
    qzeros  [K / G, N / P] int32, packed along the output dim in order; the "gptq" (v1) format
            stores zero - 1, "gptq_v2" the zero itself
    scales  [K / G, N]  float16
    g_idx   [K]         int32 group of each input row (act-order permutes it; else k // G)
    W[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]
At load time a 4-bit layer whose g_idx is k // G is repacked into AWQ's runtime layout (awq.py),
so it runs on the same W4A16 kernels; others dequantize with g_idx, then matmul.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..linear import LinearMethod, ParamLayout, add_param
from .awq import PACK, W4A16Runtime, check_group_shapes
from .base import QuantizationConfig, read_field, require
from .packing import pack_awq, unpack


def gptq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, zero_offset: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense W [K, N] (in `dtype`) of GPTQ-layout tensors; computed in float32."""
    q = unpack(qweight, bits, dim=0)  # [K, N]
    z = (unpack(qzeros, bits, dim=1) + zero_offset) & ((1 << bits) - 1)  # [K / G, N]
    groups = g_idx.long()
    return ((q - z[groups]).float() * scales.float()[groups]).to(dtype)


class GPTQLinearMethod(W4A16Runtime):
    def __init__(self, config: "GPTQConfig", prefix: str):
        self.config = config
        self.prefix = prefix

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int]) -> None:
        config = self.config
        per_word = 32 // config.bits
        group = config.group_size if config.group_size > 0 else input_size
        check_group_shapes(self.prefix, input_size, output_sizes, group, per_word)
        require(input_size % per_word == 0, f"{self.prefix}: {input_size} input features are not a multiple of "
                                            f"{per_word}, which {config.bits}-bit GPTQ packing needs")
        output_size = sum(output_sizes)
        add_param(layer, "qweight", (input_size // per_word, output_size),
                  ParamLayout(output_dim=1, input_dim=0, packed_dim=0, pack_factor=per_word, dtype=torch.int32))
        add_param(layer, "qzeros", (input_size // group, output_size // per_word),
                  ParamLayout(output_dim=1, input_dim=0, packed_dim=1, pack_factor=per_word, dtype=torch.int32))
        add_param(layer, "scales", (input_size // group, output_size),
                  ParamLayout(output_dim=1, input_dim=0, dtype=torch.float16))
        add_param(layer, "g_idx", (input_size,),
                  ParamLayout(output_dim=None, input_dim=0, dtype=torch.int32, group_index=True))
        layer.group_size = group

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        config = self.config
        in_order = torch.arange(layer.g_idx.shape[0], device=layer.g_idx.device) // layer.group_size
        layer.repacked = config.bits == 4 and torch.equal(layer.g_idx.long(), in_order)  # a host sync, once
        if not layer.repacked:
            layer.use_triton = False
            return
        values = unpack(layer.qweight.data, 4, dim=0)  # [K, N]
        zeros = (unpack(layer.qzeros.data, 4, dim=1) + config.zero_offset) & 0xF  # [K / G, N]
        awq_packed = ParamLayout(output_dim=1, input_dim=0, packed_dim=1, pack_factor=PACK, dtype=torch.int32)
        layer.qweight = nn.Parameter(pack_awq(values), requires_grad=False)
        layer.qzeros = nn.Parameter(pack_awq(zeros), requires_grad=False)
        layer.param_layouts.update(qweight=awq_packed, qzeros=awq_packed)
        del layer.g_idx
        del layer.param_layouts["g_idx"]
        super().process_weights_after_loading(layer)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        if layer.repacked:
            return super().apply(layer, x, bias)
        config = self.config
        weight = gptq_dequantize(layer.qweight, layer.qzeros, layer.scales, layer.g_idx, config.bits,
                                 config.zero_offset, x.dtype)
        out = x @ weight
        return out + bias if bias is not None else out


@dataclass(frozen=True)
class GPTQConfig(QuantizationConfig):
    name = "gptq"
    bits: int = 4
    group_size: int = 128  # -1: one group over all input rows
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"  # "gptq" (v1: zeros stored minus one) or "gptq_v2"

    @property
    def zero_offset(self) -> int:
        return 1 if self.checkpoint_format == "gptq" else 0

    @classmethod
    def from_hf(cls, quantization_config: dict) -> "GPTQConfig":
        qc = quantization_config
        bits = int(read_field(qc, "bits", default=4))
        group = int(read_field(qc, "group_size", default=128))
        fmt = str(read_field(qc, "checkpoint_format", default="gptq")).lower()
        require(bits in (4, 8), f"GPTQ with bits={bits}: tidemind runs 4- and 8-bit GPTQ only")
        require(fmt in ("gptq", "gptq_v2"), f"GPTQ checkpoint_format {fmt!r}: tidemind reads the \"gptq\" and "
                                            f"\"gptq_v2\" layouts only (not marlin or other repacked formats)")
        require(group == -1 or group > 0, f"GPTQ group_size={group} must be positive (or -1)")
        skip = tuple(read_field(qc, "modules_to_not_convert", default=()) or ())
        return cls(modules_to_not_convert=skip, bits=bits, group_size=group,
                   desc_act=bool(read_field(qc, "desc_act", default=False)),
                   sym=bool(read_field(qc, "sym", default=True)), checkpoint_format=fmt)

    def to_hf(self) -> dict:
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size, "desc_act": self.desc_act,
                "sym": self.sym, "checkpoint_format": self.checkpoint_format}

    def quantized_method(self, prefix: str) -> LinearMethod:
        return GPTQLinearMethod(self, prefix)

    def describe(self) -> str:
        return f"gptq int{self.bits} g{self.group_size}{' act-order' if self.desc_act else ''}"
