"""Attention over the paged KV cache, behind a small backend interface (base.py) with a string
registry (registry.py): "reference" (torch, also the CPU path) and "triton"."""
from .base import AttentionBackend, AttentionSpec, StepLayout
from .registry import ATTENTION_BACKENDS, create_attention_backend, resolve_attention_backend

__all__ = ["AttentionBackend", "AttentionSpec", "StepLayout", "ATTENTION_BACKENDS", "create_attention_backend",
           "resolve_attention_backend"]
