"""Mistral: the Llama block with an optional sliding window on every layer."""
from __future__ import annotations

from typing import Optional

from .llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    @classmethod
    def layer_sliding_window(cls, hf_config: dict, layer_idx: int) -> Optional[int]:
        # null (Mistral v0.2+) means full attention everywhere; absent means MistralConfig's 4096
        return hf_config.get("sliding_window", 4096)
