"""Which decoder layers of a loaded model run as one C call each on the CPU (kernels/cpu/decoder.py),
and their specs, read once after the weights are packed.

A model qualifies when all of these hold, else it keeps the per-op path (the same results, ~10
Python calls a layer):
- the C layer kernels and the C attention backend were chosen (GGUF weights at stored precision);
- one rank (no tensor parallelism: o_proj and down_proj would need an all-reduce in between);
- every layer is exactly LlamaDecoderLayer (Llama, Mistral, Qwen2, InternLM2: Gemma 3's layers have
  extra norms, a query/key norm and per-layer rotary tables, so they stay on the per-op path), with
  every linear layer a GGUF stored-precision one and a gated activation the C kernels have.
"""
from __future__ import annotations

import logging
from typing import List, Optional

from torch import nn

logger = logging.getLogger("tidemind")

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}


def _fused_linear(linear: nn.Module):
    from ..kernels.cpu.decoder import MAX_SEGMENTS, FusedLinear
    from ..layers.quantization.gguf import GGUFLinearMethod

    method = linear.__dict__.get("linear_method")
    if not isinstance(method, GGUFLinearMethod) or not method.segments or len(method.segments) > MAX_SEGMENTS:
        return None
    return FusedLinear(method.segments, linear.bias)


def layer_specs(model: nn.Module) -> Optional[List[object]]:
    """kernels/cpu/decoder.py LayerSpec of every decoder layer of `model` (a LlamaForCausalLM), or
    None where the model does not qualify."""
    from ..kernels.cpu.decoder import LayerSpec
    from .llama import LlamaDecoderLayer

    ctx = model.ctx
    if ctx.kernels.name != "cpu" or ctx.attention_backend.name != "cpu" or ctx.tp_size != 1:
        return None
    specs = []
    for layer in model.model.layers:
        if type(layer) is not LlamaDecoderLayer:
            return None
        attn, mlp = layer.self_attn, layer.mlp
        linears = [_fused_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        act = _ACTIVATIONS.get(mlp.act_fn.name)
        norms = (layer.input_layernorm, layer.post_attention_layernorm)
        if any(linear is None for linear in linears) or act is None or norms[0].eps != norms[1].eps \
                or norms[0].weight_offset != norms[1].weight_offset:
            return None
        spec = attn.attn.spec
        specs.append(LayerSpec(*linears, input_norm=norms[0].weight, post_norm=norms[1].weight, eps=norms[0].eps,
                               norm_offset=norms[0].weight_offset, scale=spec.scale,
                               hidden=attn.o_proj.output_size, heads=spec.num_heads, kv_heads=spec.num_kv_heads,
                               head_dim=spec.head_dim, inter=mlp.down_proj.input_size,
                               window=spec.sliding_window or 0, act=act))
    return specs or None


def fused_cpu_layers(model: nn.Module) -> Optional[object]:
    """FusedDecoderLayers for `model` (a LlamaForCausalLM) on the attention backend's kernels, or
    None where it does not qualify."""
    from ..kernels.cpu.decoder import FusedDecoderLayers

    specs = layer_specs(model)
    if specs is None:
        return None
    fused = FusedDecoderLayers(model.ctx.attention_backend.kernels, specs)
    logger.info("decoder layers: one C call each (%d layers, %s kernels)", len(fused), fused.isa)
    return fused
