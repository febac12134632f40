"""Attention backends by name; "auto" is resolved once, at start-up, and logged by the runner.

A backend module is imported only when chosen, so the Triton one costs nothing where Triton is not
installed. FlashAttention / FlashInfer backends may be added here; none is ever required.
"""
from __future__ import annotations

import importlib
from typing import Tuple

import torch

from .base import AttentionBackend

# name -> (module under tidemind.attention, class name)
_BACKENDS = {
    "reference": ("reference", "ReferenceAttentionBackend"),
    "triton": ("triton_backend", "TritonAttentionBackend"),
}
ATTENTION_BACKENDS: Tuple[str, ...] = tuple(_BACKENDS)


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """The backend a name stands for on `device`: "auto" is triton on a CUDA device with Triton
    installed, else reference. Raises ValueError naming the fix for an unknown or unusable name."""
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of auto, {', '.join(_BACKENDS)}")
    gpu_triton = device.type == "cuda" and triton_available()
    if name == "triton" and not gpu_triton:
        raise ValueError("the triton attention backend needs a CUDA device and the triton package "
                         "(pip install triton); use --attention-backend reference")
    if name == "auto":
        return "triton" if gpu_triton else "reference"
    return name


def create_attention_backend(name: str) -> AttentionBackend:
    module_name, class_name = _BACKENDS[name]
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, class_name)()
