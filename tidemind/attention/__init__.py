"""Attention over the paged KV cache, behind a small backend interface (base.py) with a string
registry (registry.py): "reference" (torch, also the CPU path) and "triton". Each layer's paged KV
cache, quantized or not, is one LayerKVCache (kv_cache.py)."""
from .base import AttentionBackend, AttentionSpec, StepLayout
from .kv_cache import LayerKVCache
from .registry import ATTENTION_BACKENDS, create_attention_backend, resolve_attention_backend

__all__ = ["AttentionBackend", "AttentionSpec", "StepLayout", "LayerKVCache", "ATTENTION_BACKENDS",
           "create_attention_backend", "resolve_attention_backend"]
