"""SmoothQuant of one decoder layer, then its int8 export (W8A8, LMDeploy's smooth_quant layout).

For each scale group (groups.py), with a_j = max |x_j| over all calibration tokens and
w_j = max |W[:, j]| over the group's linears:
    s_j = a_j^alpha / w_j^(1 - alpha)
folded into the producing op (W * s, input / s): activation outliers move into the weights, which
int8 per output channel handles (quantize_per_channel); activations are then quantized per token
at run time (layers/quantization/w8a8.py).
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from ..layers.linear import ParamLayout
from ..layers.quantization.w8a8 import quantize_per_channel
from .groups import apply_scale, input_channel_map, layer_groups, to_prev_channels
from .observers import InputObserver

_WEIGHT = ParamLayout(output_dim=0, input_dim=1, dtype=torch.int8)
_SCALE = ParamLayout(output_dim=0, dtype=torch.float32)


def w8a8_quantizer(weight: torch.Tensor) -> Dict[str, Tuple[torch.Tensor, ParamLayout]]:
    """W [out, in] -> int8 weight [out, in] and float32 scale [out, 1]."""
    q, scale = quantize_per_channel(weight)
    return {"weight": (q, _WEIGHT), "scale": (scale, _SCALE)}


@torch.no_grad()
def smooth_layer(layer: nn.Module, observers: Dict[str, InputObserver], alpha: float) -> None:
    """Smooth one float32 decoder layer in place, ready for int8 rounding."""
    for group in layer_groups(layer):
        absmax = observers[group.linears[0]].absmax
        channel_map = input_channel_map(layer, group, absmax.numel())
        weight_max = torch.cat([layer.get_submodule(n).weight.abs() for n in group.linears]).amax(0).float()
        act = to_prev_channels(absmax.to(weight_max.device), channel_map, "amax").clamp(min=1e-5)
        wmax = to_prev_channels(weight_max, channel_map, "amax").clamp(min=1e-5)
        scale = (act.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)
        apply_scale(layer, group, scale, channel_map)
