"""Llama and the family built on its block (Mistral, Qwen2 and InternLM2 subclass it).

Block (pre-norm, residual stream carried separately so norms can fuse the add):
    h, r = input_layernorm(h, r)           # r += h; h = norm(r)
    h = o_proj(attn(rope(q), rope(k), v))  # q, k, v from one qkv_proj
    h, r = post_attention_layernorm(h, r)
    h = down_proj(act(gate) * up)          # gate, up from one gate_up_proj
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

import torch
from torch import nn

from ..config import ModelConfig
from ..layers.activation import GatedActivation
from ..attention.kv_cache import LayerKVCache
from ..layers.attention import Attention
from ..layers.context import BuildContext
from ..layers.embedding import LMHead, VocabEmbedding
from ..layers.linear import ROW, Linear, MergedLinear, QKVLinear
from ..layers.parallel import divide
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding, rope_parameters_from_config
from .weights import LLAMA_STACKED_RULES, NameMapper, load_checkpoint_weights


def require(hf_config: dict, key: str):
    if hf_config.get(key) is None:
        arch = (hf_config.get("architectures") or ["this model"])[0]
        raise ValueError(f"config.json lacks {key!r}, which {arch} needs; add it to config.json")
    return hf_config[key]


def as_id_tuple(value) -> Tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


@dataclass(frozen=True)
class BlockArgs:
    """Sizes and switches of one decoder block, read once from config.json."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool


class GatedMLP(nn.Module):
    """down_proj(act(gate_proj(x)) * up_proj(x)) with gate and up in one matmul.

    Tensor-parallel: gate_up column-parallel (each rank its intermediate / tp features of gate and
    of up), down row-parallel (its all-reduce is the MLP's one collective).

    forward: [num_tokens, hidden] -> [num_tokens, hidden]
    """

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, ctx: BuildContext, prefix: str,
                 bias: bool = False):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size, intermediate_size], bias=bias,
                                         shard_names=("gate", "up"),
                                         linear_method=ctx.linear_method(f"{prefix}.gate_up_proj"), tp=ctx.tp_group)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=bias,
                                linear_method=ctx.linear_method(f"{prefix}.down_proj"), parallel=ROW, tp=ctx.tp_group)
        self.act_fn = GatedActivation(hidden_act, ctx.kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    """forward: hidden [T, hidden], rope (positions [T], cos/sin table) -> [T, hidden].

    Tensor-parallel: this rank's query heads and their kv heads (qkv_proj column-parallel, attention
    over them alone), o_proj row-parallel: the attention block's one all-reduce."""

    def __init__(self, args: BlockArgs, sliding_window: Optional[int], ctx: BuildContext, prefix: str):
        super().__init__()
        self.qkv_proj, self.o_proj = attention_projections(args, ctx, prefix)
        self.attn = Attention(self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, args.head_dim,
                              scale=args.head_dim ** -0.5, backend=ctx.attention_backend,
                              sliding_window=sliding_window, rotary_embedding=ctx.kernels.rotary_embedding)

    def forward(self, hidden: torch.Tensor, rope: Tuple[torch.Tensor, torch.Tensor], kv_cache: LayerKVCache,
                meta) -> torch.Tensor:
        q, k, v = self.qkv_proj.split(self.qkv_proj(hidden))
        return self.o_proj(self.attn(q, k, v, kv_cache, meta, rope))


def attention_projections(args: BlockArgs, ctx: BuildContext, prefix: str) -> Tuple[QKVLinear, Linear]:
    """(qkv_proj, o_proj) of an attention block: column- and row-parallel over ctx.tp_group."""
    qkv = QKVLinear(args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads, bias=args.qkv_bias,
                    linear_method=ctx.linear_method(f"{prefix}.qkv_proj"), tp=ctx.tp_group)
    o_proj = Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias,
                    linear_method=ctx.linear_method(f"{prefix}.o_proj"), parallel=ROW, tp=ctx.tp_group)
    return qkv, o_proj


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: BlockArgs, sliding_window: Optional[int], ctx: BuildContext, prefix: str):
        # prefix: this layer's name in the model, e.g. "model.layers.3"
        super().__init__()
        kernels = ctx.kernels
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, kernels=kernels)
        self.self_attn = LlamaAttention(args, sliding_window, ctx, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, kernels=kernels)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, args.hidden_act, ctx, f"{prefix}.mlp",
                            bias=args.mlp_bias)

    def forward(self, hidden: torch.Tensor, residual: Optional[torch.Tensor], rope: Tuple[torch.Tensor, ...],
                kv_cache: LayerKVCache, meta) -> Tuple[torch.Tensor, torch.Tensor]:
        # hidden, residual: [T, hidden]; residual is None before the first layer
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(hidden, rope, kv_cache, meta)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, layers: List[nn.Module], embed_tokens: VocabEmbedding, norm: RMSNorm):
        super().__init__()
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(layers)
        self.norm = norm


class LlamaForCausalLM(nn.Module):
    """Subclasses change behaviour through the hooks below, not by branching here."""

    def __init__(self, hf_config: dict, ctx: Optional[BuildContext] = None):
        super().__init__()
        self.hf_config = hf_config
        self.ctx = ctx or BuildContext()
        self.config = self.model_config(hf_config)
        args = self.block_args(hf_config)
        self.head_dim = args.head_dim
        if self.ctx.tp_size > 1:  # the sizes tensor parallelism splits, named as config.json names them
            divide(args.intermediate_size, self.ctx.tp_size, "intermediate_size")
        layers = [self.build_layer(args, i) for i in range(self.config.num_layers)]
        embed = VocabEmbedding(self.config.vocab_size, args.hidden_size, scale=self.embedding_scale(hf_config),
                               linear_method=self.ctx.linear_method("model.embed_tokens"), tp=self.ctx.tp_group)
        self.model = LlamaModel(layers, embed, RMSNorm(args.hidden_size, args.rms_norm_eps,
                                                       weight_offset=self.norm_weight_offset,
                                                       kernels=self.ctx.kernels))
        self.tie_word_embeddings = bool(hf_config.get("tie_word_embeddings", False))
        self.lm_head = LMHead(self.config.vocab_size, args.hidden_size,
                              tied_to=embed if self.tie_word_embeddings else None,
                              softcap=self.logit_softcap(hf_config),
                              linear_method=None if self.tie_word_embeddings else self.ctx.linear_method("lm_head"),
                              tp=self.ctx.tp_group)
        self.rotary_emb = self.build_rotary(hf_config, args.head_dim)
        self.cpu_layers = None  # kernels/cpu/decoder.py FusedDecoderLayers, set after loading where it applies

    # ---- per-architecture hooks -------------------------------------------------------------
    norm_weight_offset = 0.0

    @classmethod
    def model_config(cls, hf_config: dict) -> ModelConfig:
        hidden = require(hf_config, "hidden_size")
        heads = require(hf_config, "num_attention_heads")
        return ModelConfig(
            architecture=(hf_config.get("architectures") or [cls.__name__])[0],
            model_type=hf_config.get("model_type", ""),
            hidden_size=hidden,
            num_layers=require(hf_config, "num_hidden_layers"),
            num_attention_heads=heads,
            num_kv_heads=hf_config.get("num_key_value_heads") or heads,
            head_dim=hf_config.get("head_dim") or hidden // heads,
            vocab_size=require(hf_config, "vocab_size"),
            max_position_embeddings=hf_config.get("max_position_embeddings") or 2048,
            eos_token_ids=as_id_tuple(hf_config.get("eos_token_id")),
            bos_token_id=hf_config.get("bos_token_id"),
            checkpoint_dtype=hf_config.get("torch_dtype") or hf_config.get("dtype"),
            hf_config=hf_config,
        )

    @classmethod
    def block_args(cls, hf_config: dict) -> BlockArgs:
        config = cls.model_config(hf_config)
        attention_bias = bool(hf_config.get("attention_bias", False))
        return BlockArgs(hidden_size=config.hidden_size, num_heads=config.num_attention_heads,
                         num_kv_heads=config.num_kv_heads, head_dim=config.head_dim,
                         intermediate_size=require(hf_config, "intermediate_size"),
                         rms_norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
                         hidden_act=hf_config.get("hidden_act", "silu"),
                         qkv_bias=attention_bias, o_bias=attention_bias,
                         mlp_bias=bool(hf_config.get("mlp_bias", False)))

    @classmethod
    def layer_sliding_window(cls, hf_config: dict, layer_idx: int) -> Optional[int]:
        return None

    def build_layer(self, args: BlockArgs, layer_idx: int) -> nn.Module:
        return LlamaDecoderLayer(args, self.layer_sliding_window(self.hf_config, layer_idx), self.ctx,
                                 f"model.layers.{layer_idx}")

    @classmethod
    def embedding_scale(cls, hf_config: dict) -> Optional[float]:
        return None

    @classmethod
    def logit_softcap(cls, hf_config: dict) -> Optional[float]:
        return None

    def build_rotary(self, hf_config: dict, head_dim: int) -> RotaryEmbedding:
        return RotaryEmbedding(head_dim, rope_parameters_from_config(hf_config),
                               self.config.max_position_embeddings)

    def rotary_embeddings(self) -> List[RotaryEmbedding]:
        return [self.rotary_emb]

    def rope_inputs(self, positions: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        # what every layer's forward receives as `rope`: (positions [T], cos/sin table [max_pos, D])
        return positions, self.rotary_emb.table(positions.device)

    def name_mapper(self) -> NameMapper:
        ignore = ("rotary_emb.inv_freq",) + (("lm_head.weight",) if self.tie_word_embeddings else ())
        return NameMapper(rules=LLAMA_STACKED_RULES, ignore=ignore)

    def expand_weight(self, ckpt_name: str, tensor: torch.Tensor
                      ) -> Optional[List[Tuple[str, Optional[str], torch.Tensor]]]:
        # [(parameter name, shard, tensor)] for checkpoint tensors the name mapper cannot place
        # alone (packed tensors, renamed prefixes); None: use the mapper
        return None

    # ---- the model contract -------------------------------------------------------------------
    def after_weights_processed(self) -> None:
        """Called by the loader once every weight is packed: on the CPU stored-precision path,
        prepare the decoder layers' one-call-each form (models/cpu_layers.py says when it applies)."""
        from .cpu_layers import fused_cpu_layers
        self.cpu_layers = fused_cpu_layers(self)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: List[LayerKVCache],
                meta) -> torch.Tensor:
        # input_ids, positions: [T] int32 or int64; meta: the attention backend's metadata of the step
        # -> hidden [T, hidden]
        if len(kv_caches) != len(self.model.layers):
            raise ValueError(f"got {len(kv_caches)} KV caches for {len(self.model.layers)} layers")
        hidden = self.model.embed_tokens(input_ids)
        rope = self.rope_inputs(positions)
        fused = self.cpu_layers
        if fused is not None and fused.accepts(hidden, rope[1], kv_caches, meta):
            hidden, residual = fused.run(hidden, rope[0], rope[1], kv_caches, meta)  # the loop below, in C
        else:
            residual = None
            for layer, kv_cache in zip(self.model.layers, kv_caches):
                hidden, residual = layer(hidden, residual, rope, kv_cache, meta)
        hidden, _ = self.model.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # [num_rows, hidden] -> float32 [num_rows, vocab]
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[Tuple[str, torch.Tensor]]) -> None:
        load_checkpoint_weights(self, weights, self.name_mapper(), expand=self.expand_weight)
