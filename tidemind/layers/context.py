"""What every model constructor receives: the choices made once at start-up that shape its layers.

The layer kernels (norms, rotary, activations), the attention backend and the quantization method
(read from the checkpoint's quantization_config by the loader). Layers ask the context for their
linear method by prefix instead of models branching on quantization; the tensor-parallel rank and
size will join here the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..attention.base import AttentionBackend
from ..attention.reference import ReferenceAttentionBackend
from ..kernels.registry import REFERENCE_KERNELS, KernelSet
from .linear import LinearMethod, UnquantizedLinearMethod
from .quantization.base import QuantizationConfig


@dataclass(frozen=True)
class BuildContext:
    kernels: KernelSet = REFERENCE_KERNELS
    attention_backend: AttentionBackend = field(default_factory=ReferenceAttentionBackend)
    # None: every layer dense. Set by the loader from config.json's quantization_config.
    quantization: Optional[QuantizationConfig] = None

    def linear_method(self, prefix: str) -> LinearMethod:
        """The method of the layer named `prefix` in the model's own terms, e.g.
        "model.layers.0.self_attn.qkv_proj", "model.embed_tokens", "lm_head"."""
        if self.quantization is None:
            return UnquantizedLinearMethod()
        return self.quantization.linear_method(prefix)

    def describe(self) -> str:
        quant = self.quantization.describe() if self.quantization is not None else "none"
        return f"kernels={self.kernels.name}, attention={self.attention_backend.name}, quantization={quant}"
