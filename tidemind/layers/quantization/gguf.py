"""GGUF weights at their stored precision, on the CPU (quant_method "gguf", written by
loader/gguf.py's keep_quantized conversion).

Per layer (N outputs, K inputs; every linear layer, the embedding table and an untied LM head):
    qweight [N, K]       int8     the GGUF block integers (4-bit types in [0, 15] or [-8, 7])
    qscale  [N, K / 16]  float32  w[n, k] = qscale[n, k / 16] * qweight[n, k] + qmin[n, k / 16]
    qmin    [N, K / 16]  float32
After loading, each run of merged shards (q | k | v, gate | up) that shares one packed format
(kernels/cpu/qformat.py: 4- or 8-bit, group 32 or 16, half or float32 scales) is repacked into the
CPU kernels' tiles and the loaded tensors are dropped: a layer then holds about the bytes the GGUF
file holds for it. apply() runs kernels/cpu qlinear (activations quantized to int8 per block of 32
inputs, as llama.cpp does), one call per run, each writing its columns of the output.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..linear import LinearMethod, ParamLayout, add_param
from .base import QuantizationConfig, require

SCALE_GROUP = 16  # inputs per stored (qscale, qmin) pair


class GGUFLinearMethod(LinearMethod):
    def __init__(self):
        self.segments: List[Tuple[int, int, object]] = []  # (first output, outputs, PackedQWeight)

    def create_weights(self, layer: nn.Module, input_size: int, output_sizes: Sequence[int]) -> None:
        if input_size % 32:
            raise ValueError(f"GGUF weights at stored precision need a multiple of 32 inputs, got {input_size}")
        n = sum(output_sizes)
        add_param(layer, "qweight", (n, input_size), ParamLayout(output_dim=0, input_dim=1, dtype=torch.int8))
        for name in ("qscale", "qmin"):
            add_param(layer, name, (n, input_size // SCALE_GROUP),
                      ParamLayout(output_dim=0, input_dim=1, dtype=torch.float32))
        layer.gguf_output_sizes = list(output_sizes)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        from ...kernels.cpu.library import kernels
        from ...kernels.cpu.qformat import choose_format

        if layer.qweight.device.type != "cpu":
            raise ValueError("GGUF weights at stored precision run on the CPU only; on a GPU pass the .gguf file "
                             "itself (it is dequantized there)")
        cpu = kernels()
        runs: List[Tuple[int, int, object]] = []  # (first output, outputs, QFormat)
        offset = 0
        for size in layer.gguf_output_sizes:
            rows = slice(offset, offset + size)
            fmt = choose_format(layer.qweight.data[rows], layer.qscale.data[rows], layer.qmin.data[rows])
            if runs and runs[-1][2].describe() == fmt.describe():  # same format: one call for both
                start, width, previous = runs[-1]
                runs[-1] = (start, width + size, previous.concat(fmt))
            else:
                runs.append((offset, size, fmt))
            offset += size
        self.segments = [(start, width, cpu.pack(fmt)) for start, width, fmt in runs]
        self.kernels = cpu
        for name in ("qweight", "qscale", "qmin"):  # the packed tiles are the weight from now on
            layer.register_parameter(name, None)

    @property
    def nbytes(self) -> int:
        return sum(packed.nbytes for _, _, packed in self.segments)

    def describe(self) -> str:
        return " | ".join(packed.describe() for _, _, packed in self.segments)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        # x [..., K] -> [..., N] float32
        x2 = x.reshape(-1, x.shape[-1]).float()
        if len(self.segments) == 1:
            out = self.kernels.qlinear(self.segments[0][2], x2, bias)
        else:
            out = torch.empty((x2.shape[0], sum(width for _, width, _ in self.segments)), dtype=torch.float32)
            for start, width, packed in self.segments:
                part_bias = bias[start:start + width] if bias is not None else None
                self.kernels.qlinear(packed, x2, part_bias, out=out[:, start:start + width])
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def embedding(self, layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
        (_, _, packed), = self.segments
        return self.kernels.qrows(packed, ids)


@dataclass(frozen=True)
class GGUFConfig(QuantizationConfig):
    """Every 2-D weight of the model, embedding and LM head included, at its GGUF precision."""

    name = "gguf"

    @classmethod
    def from_hf(cls, quantization_config: dict) -> "GGUFConfig":
        unknown = sorted(set(quantization_config) - {"quant_method"})
        require(not unknown, f"quant_method gguf takes no settings, found {', '.join(unknown)}; convert the .gguf "
                             f"file again (pass the file itself as the model)")
        return cls()

    def to_hf(self) -> dict:
        return {"quant_method": "gguf"}

    def quantizes(self, prefix: str) -> bool:
        return True

    def quantized_method(self, prefix: str) -> LinearMethod:
        return GGUFLinearMethod()

    def describe(self) -> str:
        return "gguf (stored precision, CPU int4 / int8 kernels)"
