"""What every model constructor receives: the choices made once at start-up that shape its layers.

Today: the layer kernels (norms, rotary, activations) and the attention backend. The quantization
method and the tensor-parallel rank and size join here, so that layers ask the context instead of
models branching on them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..attention.base import AttentionBackend
from ..attention.reference import ReferenceAttentionBackend
from ..kernels.registry import REFERENCE_KERNELS, KernelSet


@dataclass(frozen=True)
class BuildContext:
    kernels: KernelSet = REFERENCE_KERNELS
    attention_backend: AttentionBackend = field(default_factory=ReferenceAttentionBackend)

    def describe(self) -> str:
        return f"kernels={self.kernels.name}, attention={self.attention_backend.name}"
