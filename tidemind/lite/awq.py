"""AWQ (activation-aware weight quantization) of one decoder layer, then its int4 export.

For each scale group (groups.py), with X the group's sampled inputs and x_mean = mean |X| per
channel over all calibration tokens:
    s(r) = x_mean^r / sqrt(max * min)          (r = 0 is plain round-to-nearest)
    loss(r) = || f(Q(W * s) / s) - f(W) ||^2   f: the group's linears, or for gate/up the whole MLP
    --search-scale: r from a grid of 20 values in [0, 1), the lowest loss wins; else r = 0.5
then s is folded into the producing op (W * s, input / s). With --search-scale each linear's
weights are also clipped per (row, group) to the shrink of max|w| (down to half) that best keeps
x @ w of its group on the sampled inputs (not q and k, whose rounding errors attention amplifies
less than clipping would cost). Finally W is rounded to int4 per group (quantizer.py) and saved in
AutoAWQ's GEMM layout. --rtn skips everything but the rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.linear import MergedLinear, ParamLayout
from ..layers.quantization.awq import PACK, AWQConfig
from ..layers.quantization.packing import pack_awq
from .groups import ScaleGroup, apply_scale, input_channel_map, layer_groups, to_input_channels, to_prev_channels
from .observers import InputObserver
from .quantizer import fake_quantize_int4, quantize_int4

SCALE_GRID = 20
FIXED_RATIO = 0.5
CLIP_GRID = 20
CLIP_MAX_SHRINK = 0.5
CLIP_ROWS = 512  # sampled input rows the clip search evaluates
CLIP_OUTPUT_BATCH = 256  # output rows per step of the clip search (bounds its memory)
NOT_CLIPPED = ("q", "k")  # shards of qkv_proj left unclipped

_PACKED = ParamLayout(output_dim=1, input_dim=0, packed_dim=1, pack_factor=PACK, dtype=torch.int32)
_SCALES = ParamLayout(output_dim=1, input_dim=0, dtype=torch.float16)


@dataclass(frozen=True)
class AWQSettings:
    group_size: int = 128
    sym: bool = False
    search_scale: bool = False
    rtn: bool = False  # round to nearest only: no calibration, no scaling, no clipping

    def config(self) -> AWQConfig:
        return AWQConfig(bits=4, group_size=self.group_size)


def awq_quantizer(settings: AWQSettings) -> Callable[[torch.Tensor], Dict[str, Tuple[torch.Tensor, ParamLayout]]]:
    """W [out, in] -> AutoAWQ GEMM tensors (qweight [in, out / 8], qzeros [in / G, out / 8],
    scales [in / G, out]) with their layouts."""
    def quantize(weight: torch.Tensor):
        q, scale, zero = quantize_int4(weight, settings.group_size, settings.sym)
        return {"qweight": (pack_awq(q.t()), _PACKED), "qzeros": (pack_awq(zero.t().to(torch.int32)), _PACKED),
                "scales": (scale.t().to(torch.float16), _SCALES)}
    return quantize


def _group_forward(layer: nn.Module, group: ScaleGroup) -> Callable[[torch.Tensor, List[torch.Tensor]], torch.Tensor]:
    """f(x, weights of the group's linears) -> what the search compares (see module docstring)."""
    linears = [layer.get_submodule(name) for name in group.linears]

    def forward(x: torch.Tensor, weights: List[torch.Tensor]) -> torch.Tensor:
        outs = [F.linear(x, w, None if m.bias is None else m.bias.float()) for m, w in zip(linears, weights)]
        out = torch.cat(outs, dim=-1)
        if group.mlp_loss:
            mlp = layer.mlp
            down = mlp.down_proj
            out = F.linear(mlp.act_fn(out), down.weight.float(), None if down.bias is None else down.bias.float())
        return out
    return forward


@torch.no_grad()
def search_group_scale(x: torch.Tensor, x_mean: torch.Tensor, weights: List[torch.Tensor], forward,
                       channel_map, settings: AWQSettings) -> torch.Tensor:
    """The per-prev-channel scale s of a group (see the module docstring)."""
    reference = forward(x, weights)
    mean = to_prev_channels(x_mean.to(x.device), channel_map, "mean").clamp(min=1e-4)
    ratios = [i / SCALE_GRID for i in range(SCALE_GRID)] if settings.search_scale else [FIXED_RATIO]
    best, best_loss = None, float("inf")
    for ratio in ratios:
        s = mean.pow(ratio)
        s = s / (s.max() * s.min()).sqrt()
        s_in = to_input_channels(s, channel_map)
        trial = [fake_quantize_int4(w * s_in, settings.group_size, settings.sym) / s_in for w in weights]
        loss = (forward(x, trial) - reference).pow(2).mean().item()
        if loss < best_loss:
            best, best_loss = s, loss
    return best


@torch.no_grad()
def clip_rows(weight: torch.Tensor, x: torch.Tensor, settings: AWQSettings) -> torch.Tensor:
    """weight [out, in] clamped per (row, group) to the best shrink of its max |w| (see above)."""
    group = settings.group_size
    out_f, in_f = weight.shape
    x = x[::max(1, x.shape[0] // CLIP_ROWS)][:CLIP_ROWS].view(-1, in_f // group, group)  # [rows, groups, G]
    clipped = torch.empty_like(weight)
    for start in range(0, out_f, CLIP_OUTPUT_BATCH):
        w = weight[start:start + CLIP_OUTPUT_BATCH].view(-1, in_f // group, group)  # [ob, groups, G]
        reference = torch.einsum("rgk,ogk->org", x, w)
        max_abs = w.abs().amax(-1, keepdim=True)  # [ob, groups, 1]
        best_max, best_err = max_abs.clone(), torch.full(max_abs.shape[:2], float("inf"), device=w.device)
        for step in range(int(CLIP_MAX_SHRINK * CLIP_GRID)):
            limit = max_abs * (1 - step / CLIP_GRID)
            trial = fake_quantize_int4(torch.maximum(torch.minimum(w, limit), -limit).reshape(-1, in_f),
                                       group, settings.sym).view_as(w)
            err = (torch.einsum("rgk,ogk->org", x, trial) - reference).pow(2).mean(1)  # [ob, groups]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_max = torch.where(better.unsqueeze(-1), limit, best_max)
        clipped[start:start + CLIP_OUTPUT_BATCH] = torch.maximum(torch.minimum(w, best_max), -best_max).view(-1, in_f)
    return clipped


def _clip_linear(module: nn.Module, x: torch.Tensor, settings: AWQSettings) -> None:
    ranges = (module.shard_offsets().items() if isinstance(module, MergedLinear) else [(None, (0, module.output_size))])
    weight = module.weight.data
    for shard, (start, size) in ranges:
        if shard not in NOT_CLIPPED:
            weight[start:start + size] = clip_rows(weight[start:start + size].float(), x, settings).to(weight.dtype)


@torch.no_grad()
def awq_layer(layer: nn.Module, observers: Dict[str, InputObserver], settings: AWQSettings) -> None:
    """Scale (and with search_scale, clip) one float32 decoder layer in place, ready for rounding."""
    samples = {name: obs.sample() for name, obs in observers.items()}
    for group in layer_groups(layer):
        name = group.linears[0]
        x = samples[name]
        weights = [layer.get_submodule(n).weight.float() for n in group.linears]
        channel_map = input_channel_map(layer, group, x.shape[-1])
        scale = search_group_scale(x, observers[name].absmean, weights, _group_forward(layer, group), channel_map,
                                   settings)
        scale_in = apply_scale(layer, group, scale, channel_map)
        for n in group.linears:
            samples[n] = samples[n] / scale_in  # the inputs the scaled weights now see
    if settings.search_scale:
        for name, x in samples.items():
            _clip_linear(layer.get_submodule(name), x, settings)
