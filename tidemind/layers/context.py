"""What every model constructor receives: the choices made once at start-up that shape its layers.

The layer kernels (norms, rotary, activations), the attention backend, the quantization method
(read from the checkpoint's quantization_config by the loader) and the tensor-parallel group of the
rank being built (layers/parallel.py: its rank, size and collectives; SINGLE_RANK without tensor
parallelism). Layers ask the context for their linear method by prefix instead of models branching
on quantization, and take its tp_group to know which slice of each weight they hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..attention.base import AttentionBackend
from ..attention.reference import ReferenceAttentionBackend
from ..kernels.registry import REFERENCE_KERNELS, KernelSet
from .linear import LinearMethod, UnquantizedLinearMethod
from .parallel import SINGLE_RANK, TPGroup
from .quantization.base import QuantizationConfig


@dataclass(frozen=True)
class BuildContext:
    kernels: KernelSet = REFERENCE_KERNELS
    attention_backend: AttentionBackend = field(default_factory=ReferenceAttentionBackend)
    # None: every layer dense. Set by the loader from config.json's quantization_config.
    quantization: Optional[QuantizationConfig] = None
    tp_group: TPGroup = SINGLE_RANK

    @property
    def tp_rank(self) -> int:
        return self.tp_group.rank

    @property
    def tp_size(self) -> int:
        return self.tp_group.size

    def linear_method(self, prefix: str) -> LinearMethod:
        """The method of the layer named `prefix` in the model's own terms, e.g.
        "model.layers.0.self_attn.qkv_proj", "model.embed_tokens", "lm_head"."""
        if self.quantization is None:
            return UnquantizedLinearMethod()
        return self.quantization.linear_method(prefix)

    def describe(self) -> str:
        quant = self.quantization.describe() if self.quantization is not None else "none"
        tp = f", tp rank {self.tp_rank} of {self.tp_size}" if self.tp_size > 1 else ""
        return f"kernels={self.kernels.name}, attention={self.attention_backend.name}, quantization={quant}{tp}"
