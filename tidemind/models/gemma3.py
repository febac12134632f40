"""Gemma 3 (text): Llama-like blocks with Gemma's own traits.

    embeddings * sqrt(hidden) (in the model dtype); every RMSNorm scales by (1 + w)
    h, r = input_layernorm(h, r)
    h = post_attention_layernorm(o_proj(attn(rope(q_norm(q)), rope(k_norm(k)), v)))   scale = query_pre_attn_scalar**-0.5
    h, r = pre_feedforward_layernorm(h, r)
    h = post_feedforward_layernorm(down(gelu_tanh(gate) * up))
Layers alternate local (sliding window, rope base 10k) and global (full, rope base 1M) attention,
5 local : 1 global unless config.json's layer_types says otherwise.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional, Tuple

import torch
from torch import nn

from ..attention.kv_cache import LayerKVCache
from ..layers.attention import Attention
from ..layers.context import BuildContext
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding, rope_parameters_from_config
from .llama import BlockArgs, GatedMLP, LlamaForCausalLM, attention_projections

SLIDING, FULL = "sliding_attention", "full_attention"

# Gemma3TextConfig's defaults: multimodal checkpoints store only the fields that differ.
_TEXT_DEFAULTS = {
    "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
    "query_pre_attn_scalar": 256, "sliding_window": 4096, "tie_word_embeddings": True,
    "eos_token_id": 1, "bos_token_id": 2, "attention_bias": False, "model_type": "gemma3_text",
}


def gemma3_text_config(hf_config: dict) -> dict:
    """The text model's config: the text_config of a multimodal checkpoint, with Gemma 3 defaults."""
    text = dict(hf_config.get("text_config") or hf_config)
    text.setdefault("architectures", hf_config.get("architectures"))
    for key, value in _TEXT_DEFAULTS.items():
        text.setdefault(key, value)
    return text


def layer_types(hf_config: dict) -> list:
    types = hf_config.get("layer_types")
    if types is None:
        pattern = hf_config.get("sliding_window_pattern") or hf_config.get("_sliding_window_pattern") or 6
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(hf_config["num_hidden_layers"])]
    return list(types)


def gemma3_rope_parameters(hf_config: dict, layer_type: str) -> dict:
    params = hf_config.get("rope_parameters")
    if params is not None and any(isinstance(value, dict) for value in params.values()):
        return rope_parameters_from_config(hf_config, layer_type)
    if layer_type == SLIDING:  # old style: local layers use rope_local_base_freq, never scaling
        return {"rope_type": "default", "rope_theta": float(hf_config.get("rope_local_base_freq") or 10000.0)}
    return rope_parameters_from_config(hf_config, default_theta=1_000_000.0)


class Gemma3Attention(nn.Module):
    def __init__(self, args: BlockArgs, sliding_window: Optional[int], query_pre_attn_scalar: float,
                 ctx: BuildContext, prefix: str):
        super().__init__()
        self.head_dim = args.head_dim
        self.qkv_proj, self.o_proj = attention_projections(args, ctx, prefix)
        self.q_norm = RMSNorm(args.head_dim, args.rms_norm_eps, weight_offset=1.0, kernels=ctx.kernels)
        self.k_norm = RMSNorm(args.head_dim, args.rms_norm_eps, weight_offset=1.0, kernels=ctx.kernels)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, args.head_dim,
                              scale=query_pre_attn_scalar ** -0.5, backend=ctx.attention_backend,
                              sliding_window=sliding_window, rotary_embedding=ctx.kernels.rotary_embedding)

    def forward(self, hidden: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor], kv_cache: LayerKVCache,
                meta) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        # per-head norms: [T, H*D] -> [T*H, D] -> back
        q = self.q_norm(q.reshape(-1, self.head_dim)).reshape(num_tokens, -1)
        k = self.k_norm(k.reshape(-1, self.head_dim)).reshape(num_tokens, -1)
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, rope))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, args: BlockArgs, layer_type: str, sliding_window: Optional[int],
                 query_pre_attn_scalar: float, ctx: BuildContext, prefix: str):
        super().__init__()
        self.layer_type = layer_type
        eps, hidden, kernels = args.rms_norm_eps, args.hidden_size, ctx.kernels
        self.input_layernorm = RMSNorm(hidden, eps, weight_offset=1.0, kernels=kernels)
        self.self_attn = Gemma3Attention(args, sliding_window, query_pre_attn_scalar, ctx, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(hidden, eps, weight_offset=1.0, kernels=kernels)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, weight_offset=1.0, kernels=kernels)
        self.mlp = GatedMLP(hidden, args.intermediate_size, args.hidden_act, ctx, f"{prefix}.mlp")
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, weight_offset=1.0, kernels=kernels)

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor], rope: dict,
                kv_cache: LayerKVCache, meta) -> Tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(hidden, rope[self.layer_type], kv_cache, meta))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma3ForCausalLM(LlamaForCausalLM):
    norm_weight_offset = 1.0

    def __init__(self, hf_config: dict, ctx: Optional[BuildContext] = None):
        hf_config = gemma3_text_config(hf_config)
        if hf_config.get("attn_logit_softcapping") is not None:
            raise ValueError("attn_logit_softcapping is set in config.json, which tidemind's paged attention "
                             "does not implement yet (no released Gemma 3 checkpoint uses it)")
        if hf_config.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True (an encoder-style Gemma 3) cannot be served "
                             "as a causal language model")
        self._layer_types = layer_types(hf_config)
        super().__init__(hf_config, ctx)

    @classmethod
    def model_config(cls, hf_config: dict):
        return super().model_config(gemma3_text_config(hf_config))

    @classmethod
    def block_args(cls, hf_config: dict) -> BlockArgs:
        args = super().block_args(hf_config)
        act = hf_config.get("hidden_activation") or hf_config.get("hidden_act") or "gelu_pytorch_tanh"
        return replace(args, hidden_act=act, mlp_bias=False)

    @classmethod
    def embedding_scale(cls, hf_config: dict) -> Optional[float]:
        return math.sqrt(hf_config["hidden_size"])

    @classmethod
    def logit_softcap(cls, hf_config: dict) -> Optional[float]:
        return hf_config.get("final_logit_softcapping")

    def build_layer(self, args: BlockArgs, layer_idx: int) -> Gemma3DecoderLayer:
        layer_type = self._layer_types[layer_idx]
        window = self.hf_config.get("sliding_window") if layer_type == SLIDING else None
        return Gemma3DecoderLayer(args, layer_type, window, self.hf_config.get("query_pre_attn_scalar")
                                  or args.head_dim, self.ctx, f"model.layers.{layer_idx}")

    def build_rotary(self, hf_config: dict, head_dim: int) -> nn.ModuleDict:
        return nn.ModuleDict({layer_type: RotaryEmbedding(head_dim, gemma3_rope_parameters(hf_config, layer_type),
                                                          self.config.max_position_embeddings)
                              for layer_type in sorted(set(self._layer_types))})

    def rotary_embeddings(self) -> list:
        return list(self.rotary_emb.values())

    def rope_inputs(self, positions: torch.Tensor) -> dict:
        return {layer_type: (positions, rotary.table(positions.device)) for layer_type, rotary in self.rotary_emb.items()}


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The text part of a multimodal Gemma 3 checkpoint; vision tower weights are skipped."""

    # text weights as saved by transformers 4.x and 5 (language_model.model.*) or as named in
    # transformers 5 models in memory (model.language_model.*)
    _TEXT_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."),
                      ("language_model.lm_head.", "lm_head."))

    def name_mapper(self):
        mapper = super().name_mapper()
        ignore = tuple(mapper.ignore) + ("vision_tower.", "multi_modal_projector.")
        return type(mapper)(rules=mapper.rules, ignore=ignore)

    def expand_weight(self, ckpt_name: str, tensor: torch.Tensor):
        for prefix, text_prefix in self._TEXT_PREFIXES:
            if ckpt_name.startswith(prefix):
                name = text_prefix + ckpt_name[len(prefix):]
                if self.tie_word_embeddings and name == "lm_head.weight":
                    return []
                return [(*self.name_mapper().to_param(name), tensor)]
        return None
