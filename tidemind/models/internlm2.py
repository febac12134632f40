"""InternLM2: the Llama block under other names, with q, k and v packed in one `wqkv` tensor.

wqkv rows are grouped per KV head, each group holding its q heads then its k head and v head:
    [kv group 0: q_0 .. q_{n-1}, k_0, v_0 | kv group 1: q_n .. q_{2n-1}, k_1, v_1 | ...]  x head_dim
with n = num_heads // num_kv_heads, which is the order GQA pairs q heads with kv heads in.
"""
from __future__ import annotations

from dataclasses import replace
from typing import List, Optional, Tuple

import torch

from ..layers.linear import check_shape
from .llama import BlockArgs, LlamaForCausalLM
from .weights import NameMapper

_RENAMES = (
    ("^model.tok_embeddings.", "^model.embed_tokens.", None),
    (".attention.wo.", ".self_attn.o_proj.", None),
    (".attention_norm.", ".input_layernorm.", None),
    (".ffn_norm.", ".post_attention_layernorm.", None),
    (".feed_forward.w1.", ".mlp.gate_up_proj.", "gate"),
    (".feed_forward.w3.", ".mlp.gate_up_proj.", "up"),
    (".feed_forward.w2.", ".mlp.down_proj.", None),
    ("^output.", "^lm_head.", None),
    # reverse direction only (naming missing shards); wqkv itself is unpacked by expand_weight
    (".attention.wqkv.", ".self_attn.qkv_proj.", "q"),
    (".attention.wqkv.", ".self_attn.qkv_proj.", "k"),
    (".attention.wqkv.", ".self_attn.qkv_proj.", "v"),
)


class InternLM2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def block_args(cls, hf_config: dict) -> BlockArgs:
        args = super().block_args(hf_config)
        bias = bool(hf_config.get("bias", False))
        return replace(args, qkv_bias=bias, o_bias=bias, mlp_bias=False)

    def name_mapper(self) -> NameMapper:
        ignore = ("rotary_emb.inv_freq",) + (("output.weight",) if self.tie_word_embeddings else ())
        return NameMapper(rules=_RENAMES, ignore=ignore)

    def expand_weight(self, ckpt_name: str, tensor: torch.Tensor
                      ) -> Optional[List[Tuple[str, str, torch.Tensor]]]:
        if ".attention.wqkv." not in ckpt_name:
            return None
        if not ckpt_name.endswith((".weight", ".bias")):
            # packed int4 / int8 tensors group wqkv's rows differently (packed along other dims)
            raise ValueError(f"{ckpt_name!r}: quantized InternLM2 checkpoints are not supported (their packed wqkv "
                             f"cannot be split into q, k and v yet); use the unquantized model")
        cfg = self.config
        group = cfg.num_attention_heads // cfg.num_kv_heads + 2  # rows of heads per kv group
        expected = (cfg.num_kv_heads * group * cfg.head_dim,) + tuple(tensor.shape[1:])
        check_shape(f"checkpoint tensor {ckpt_name!r}", expected, tensor.shape)
        grouped = tensor.reshape(cfg.num_kv_heads, group, cfg.head_dim, *tensor.shape[1:])
        # [KVH, n + 2, D, (hidden)] -> q [KVH * n * D, (hidden)], k and v [KVH * D, (hidden)]
        q = grouped[:, :-2].reshape(-1, *tensor.shape[1:])
        k = grouped[:, -2].reshape(-1, *tensor.shape[1:])
        v = grouped[:, -1].reshape(-1, *tensor.shape[1:])
        param = ckpt_name.replace(".attention.wqkv.", ".self_attn.qkv_proj.")
        return [(param, "q", q), (param, "k", k), (param, "v", v)]
