"""Where a decoder layer can move scale between an input and the linear layers it feeds.

Scaling input channel j by 1/s_j and the weight columns that read it by s_j leaves the layer's
function unchanged; the 1/s is folded into the op that produced the input:

    input_layernorm            -> self_attn.qkv_proj      (norm weight: (w + offset) / s - offset)
    v rows of qkv_proj         -> self_attn.o_proj        (attention mixes tokens, not channels: v's
                                                           channel c scales every head's output c
                                                           that reads it, so with GQA one s per v
                                                           channel serves the heads sharing it)
    post-attention (Llama) or pre-feedforward (Gemma 3) norm -> mlp.gate_up_proj
    up rows of gate_up_proj    -> mlp.down_proj           (act(gate) * up is linear in up)

AWQ searches s to protect salient input channels before int4 rounding; SmoothQuant chooses s to
move activation outliers into the weights before int8 rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from ..models.gemma3 import Gemma3DecoderLayer
from ..models.llama import LlamaDecoderLayer


@dataclass(frozen=True)
class ScaleGroup:
    linears: Tuple[str, ...]  # linear layers reading the input, by name inside the decoder layer
    prev_norm: Optional[str] = None  # the RMSNorm producing the input
    prev_linear: Optional[Tuple[str, str]] = None  # or (merged linear, shard) whose output rows are the input
    per_head: bool = False  # input channels are attention heads x v channels (see module docstring)
    mlp_loss: bool = False  # AWQ judges this group by the MLP's output (else by the linears' outputs)


def _groups(mlp_norm: str) -> Tuple[ScaleGroup, ...]:
    return (ScaleGroup(("self_attn.qkv_proj",), prev_norm="input_layernorm"),
            ScaleGroup(("self_attn.o_proj",), prev_linear=("self_attn.qkv_proj", "v"), per_head=True),
            ScaleGroup(("mlp.gate_up_proj",), prev_norm=mlp_norm, mlp_loss=True),
            ScaleGroup(("mlp.down_proj",), prev_linear=("mlp.gate_up_proj", "up")))


_LAYER_GROUPS: Dict[type, Tuple[ScaleGroup, ...]] = {
    LlamaDecoderLayer: _groups("post_attention_layernorm"),
    Gemma3DecoderLayer: _groups("pre_feedforward_layernorm"),
}


def layer_groups(layer: nn.Module) -> Tuple[ScaleGroup, ...]:
    groups = _LAYER_GROUPS.get(type(layer))
    if groups is None:
        raise ValueError(f"no scale groups are known for {type(layer).__name__}; tidemind lite cannot smooth it")
    return groups


def input_channel_map(layer: nn.Module, group: ScaleGroup, in_features: int) -> Optional[torch.Tensor]:
    """For a per-head group: [in_features] index of the v channel each input channel reads
    (h * D + d -> (h // heads_per_kv) * D + d); None where input and prev channels coincide."""
    if not group.per_head:
        return None
    attn = layer.self_attn.attn.spec
    per_kv = attn.num_heads // attn.num_kv_heads
    heads = torch.arange(attn.num_heads).repeat_interleave(attn.head_dim)
    dims = torch.arange(attn.head_dim).repeat(attn.num_heads)
    index = (heads // per_kv) * attn.head_dim + dims
    assert index.numel() == in_features
    return index


def to_prev_channels(values: torch.Tensor, channel_map: Optional[torch.Tensor], reduce: str) -> torch.Tensor:
    """Per-input-channel values [in] -> per-prev-channel [prev] ("amax" or "mean" over the heads
    sharing a v channel)."""
    if channel_map is None:
        return values
    channel_map = channel_map.to(values.device)
    size = int(channel_map.max()) + 1
    return torch.zeros(size, dtype=values.dtype, device=values.device).scatter_reduce(
        0, channel_map, values, reduce=reduce, include_self=False)


def to_input_channels(scale: torch.Tensor, channel_map: Optional[torch.Tensor]) -> torch.Tensor:
    return scale if channel_map is None else scale[channel_map.to(scale.device)]


@torch.no_grad()
def apply_scale(layer: nn.Module, group: ScaleGroup, scale: torch.Tensor,
                channel_map: Optional[torch.Tensor]) -> torch.Tensor:
    """Fold 1/scale (per prev channel) into the producing op and scale into the linears' columns;
    returns the per-input-channel scale (what the group's input is now divided by)."""
    scale_in = to_input_channels(scale, channel_map)
    for name in group.linears:
        weight = layer.get_submodule(name).weight  # [out, in]
        weight.mul_(scale_in.to(weight.dtype).unsqueeze(0))
    if group.prev_norm is not None:
        norm = layer.get_submodule(group.prev_norm)
        offset = norm.weight_offset
        norm.weight.copy_((norm.weight + offset) / scale.to(norm.weight.dtype) - offset)
    else:
        name, shard = group.prev_linear
        producer = layer.get_submodule(name)
        start, size = producer.shard_range(shard)
        producer.weight[start:start + size].div_(scale.to(producer.weight.dtype).unsqueeze(1))
        if producer.bias is not None:
            producer.bias[start:start + size].div_(scale.to(producer.bias.dtype))
    return scale_in
