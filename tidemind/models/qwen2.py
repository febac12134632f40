"""Qwen2: the Llama block with q/k/v biases (none on o_proj) and optional sliding-window layers."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from .llama import BlockArgs, LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def block_args(cls, hf_config: dict) -> BlockArgs:
        args = super().block_args(hf_config)
        return replace(args, qkv_bias=True, o_bias=False, mlp_bias=False)

    @classmethod
    def layer_sliding_window(cls, hf_config: dict, layer_idx: int) -> Optional[int]:
        # Hugging Face: the window applies only with use_sliding_window, to the layers marked
        # "sliding_attention" in layer_types, else to layers at index >= max_window_layers.
        window = hf_config.get("sliding_window", 4096)  # Qwen2Config's default when the key is absent
        if not hf_config.get("use_sliding_window", False) or window is None:
            return None
        layer_types = hf_config.get("layer_types")
        if layer_types is not None:
            return window if layer_types[layer_idx] == "sliding_attention" else None
        return window if layer_idx >= hf_config.get("max_window_layers", 28) else None
