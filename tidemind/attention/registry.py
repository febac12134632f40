"""Attention backends by name; "auto" is resolved once, at start-up, and logged by the runner.

A backend module is imported only when chosen, so the Triton one costs nothing where Triton is not
installed. FlashAttention / FlashInfer backends may be added here; none is ever required.
"""
from __future__ import annotations

import importlib
import os
from typing import Tuple

import torch

from .base import AttentionBackend

# name -> (module under tidemind.attention, class name)
_BACKENDS = {
    "reference": ("reference", "ReferenceAttentionBackend"),
    "triton": ("triton_backend", "TritonAttentionBackend"),
    "cpu": ("cpu_backend", "CPUAttentionBackend"),
}
ATTENTION_BACKENDS: Tuple[str, ...] = tuple(_BACKENDS)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def triton_supports_head_dim(head_dim: int) -> bool:
    """The Triton attention kernels tile head_dim exactly: a power of two from 16 to 256."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def resolve_attention_backend(name: str, device: torch.device, head_dim: int, cpu_kernels: bool = False) -> str:
    """The backend a name stands for on `device`: "auto" is triton on a CUDA device with Triton
    installed when the model's head_dim suits its kernels; cpu on the CPU when cpu_kernels (the
    runner asks for them with GGUF weights at stored precision, whose kernels it has loaded); else
    reference. Raises ValueError naming the fix for an unknown or unusable name."""
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of auto, {', '.join(_BACKENDS)}")
    gpu_triton = device.type == "cuda" and triton_available()
    # Under TRITON_INTERPRET=1 the kernels run on the CPU through Triton's interpreter: slow, but it
    # lets tests run the whole engine on the Triton path where there is no GPU.
    interpreted = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1" and triton_available()
    if name == "triton" and not (gpu_triton or interpreted):
        raise ValueError("the triton attention backend needs a CUDA device and the triton package "
                         "(pip install triton); use --attention-backend reference")
    if name == "triton" and not triton_supports_head_dim(head_dim):
        raise ValueError(f"the triton attention kernels need a power-of-two head_dim in [16, 256], this model's "
                         f"is {head_dim}; use --attention-backend reference")
    if name == "cpu" and device.type != "cpu":
        raise ValueError("the cpu attention backend runs on the CPU only; use --attention-backend auto")
    if name == "auto":
        if device.type == "cpu" and cpu_kernels:
            return "cpu"
        return "triton" if gpu_triton and triton_supports_head_dim(head_dim) else "reference"
    return name


def create_attention_backend(name: str) -> AttentionBackend:
    module_name, class_name = _BACKENDS[name]
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, class_name)()
