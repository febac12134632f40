"""The attention layer: hands the step's new q, k, v to the attention backend of the model's
BuildContext (tidemind/attention), with the metadata the backend built for the step."""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import nn

from ..attention.base import AttentionBackend, AttentionSpec
from ..attention.kv_cache import LayerKVCache


class Attention(nn.Module):
    """Rotary embedding of q and k, then attention of the new tokens over the paged KV cache.

    forward: q [num_tokens, num_heads * head_dim], k and v [num_tokens, num_kv_heads * head_dim]
    (views of one fused qkv output are fine), this layer's kv_cache (attention/kv_cache.py: the
    paged data and, when quantized, its scales), the backend's metadata of the step, rope: the
    (positions [num_tokens], cos/sin table) to rotate q and k by, in place (None: they come rotated)
    -> [num_tokens, num_heads * head_dim]

    A backend that fuses_rotary rotates them in its KV write's launch; for the others the layer
    does it first with `rotary_embedding` (the model's KernelSet's: reference, Triton or the CPU's;
    a layer built without one takes q and k rotated only).
    """

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 backend: AttentionBackend, sliding_window: Optional[int] = None,
                 rotary_embedding: Optional[Callable] = None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
        self.spec = AttentionSpec(num_heads, num_kv_heads, head_dim, scale, sliding_window)
        self.backend = backend
        self.rotary_embedding = rotary_embedding

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: LayerKVCache,
                metadata: Any, rope: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        if rope is not None and not self.backend.fuses_rotary:
            if self.rotary_embedding is None:
                raise ValueError("this Attention layer was built without a rotary_embedding: pass q and k rotated")
            q, k = self.rotary_embedding(q, k, *rope)
            rope = None
        num_tokens = q.shape[0]
        spec = self.spec
        out = self.backend.forward(spec, q.view(num_tokens, spec.num_heads, spec.head_dim),
                                   k.view(num_tokens, spec.num_kv_heads, spec.head_dim),
                                   v.view(num_tokens, spec.num_kv_heads, spec.head_dim), kv_cache, metadata, rope)
        return out.reshape(num_tokens, spec.num_heads * spec.head_dim)

    def extra_repr(self) -> str:
        s = self.spec
        return (f"heads={s.num_heads}, kv_heads={s.num_kv_heads}, head_dim={s.head_dim}, "
                f"window={s.sliding_window}, backend={self.backend.name}")
