"""Rotary position embedding: frequencies from config.json, cos/sin as Hugging Face computes them.

Two config styles are read:
  old (transformers 4): rope_theta at the top level, rope_scaling = {"type"/"rope_type", factor, ...}
  new (transformers 5): rope_parameters = {"rope_type", "rope_theta", factor, ...}, or, for models
                        with per-layer-type rope (Gemma 3), {"full_attention": {...}, "sliding_attention": {...}}
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

from ..kernels import reference

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


def rope_parameters_from_config(hf_config: dict, layer_type: Optional[str] = None,
                                default_theta: float = 10000.0) -> dict:
    """The rope parameters of one layer type as a flat dict with at least rope_type and rope_theta."""
    params = hf_config.get("rope_parameters")
    if params is not None:
        nested = {key: value for key, value in params.items() if isinstance(value, dict)}
        if nested:
            if layer_type not in nested:
                raise ValueError(f"rope_parameters in config.json has entries for {sorted(nested)} but not for "
                                 f"layer type {layer_type!r}; add a {layer_type!r} entry")
            params = nested[layer_type]
        params = dict(params)
    else:
        params = dict(hf_config.get("rope_scaling") or {})
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params.pop("type", None)
    if params.get("rope_theta") is None:
        theta = hf_config.get("rope_theta")
        params["rope_theta"] = float(theta if theta is not None else default_theta)
    partial = params.get("partial_rotary_factor", hf_config.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"partial_rotary_factor={partial} is not supported (only full-width rotary embeddings)")
    return params


def _default_inv_freq(base: float, dim: int) -> torch.Tensor:
    # Exactly Hugging Face's float32 expression; on the CPU whatever device the model is built on.
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))


def _llama3_inv_freq(params: dict, dim: int, max_position_embeddings: int) -> torch.Tensor:
    inv_freq = _default_inv_freq(params["rope_theta"], dim)
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params.get("original_max_position_embeddings") or max_position_embeddings
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by factor, short ones kept, the band between interpolated
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def _yarn_inv_freq(params: dict, dim: int, max_position_embeddings: int) -> Tuple[torch.Tensor, float]:
    base = params["rope_theta"]
    original_max = params.get("original_max_position_embeddings") or max_position_embeddings
    factor = params.get("factor") or max_position_embeddings / original_max

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else get_mscale(factor))
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # keeps the ramp finite
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation_weight = 1 - ramp  # 1: keep the original frequency, 0: interpolate by factor
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def compute_inv_freq(params: dict, head_dim: int, max_position_embeddings: int) -> Tuple[torch.Tensor, float]:
    """(inv_freq [head_dim // 2] float32 on the CPU, attention_scaling applied to cos and sin)."""
    rope_type = params["rope_type"]
    if rope_type == "default":
        return _default_inv_freq(params["rope_theta"], head_dim), 1.0
    if rope_type == "linear":
        return _default_inv_freq(params["rope_theta"], head_dim) / params["factor"], 1.0
    if rope_type == "dynamic":
        # Hugging Face's dynamic NTK equals the default frequencies up to max_position_embeddings and
        # rescales only past it; the engine bounds sequences by max_position_embeddings by default.
        return _default_inv_freq(params["rope_theta"], head_dim), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(params, head_dim, max_position_embeddings), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(params, head_dim, max_position_embeddings)
    raise ValueError(f"rope type {rope_type!r} is not supported; supported rope types: "
                     f"{', '.join(SUPPORTED_ROPE_TYPES)} (see rope_scaling / rope_parameters in config.json)")


class RotaryEmbedding(nn.Module):
    """The cos/sin table of one rope configuration; layers rotate q and k through their KernelSet's
    rotary_embedding(q, k, positions, table) ("rotate half" layout).

    table(device): float32 [max_positions, head_dim], row p = [cos(p * inv_freq) | sin(p * inv_freq)]
    (times attention_scaling), the angles formed in float32 exactly as Hugging Face forms them per
    step. Built once per device on first use; reserve() raises its length before that (sequences
    may run past max_position_embeddings when session_len asks for it).
    """

    def __init__(self, head_dim: int, params: dict, max_position_embeddings: int):
        super().__init__()
        self.head_dim = head_dim
        self.rope_type = params["rope_type"]
        self.base = params["rope_theta"]
        inv_freq, self.attention_scaling = compute_inv_freq(params, head_dim, max_position_embeddings)
        # Plain attributes, not buffers: they survive meta-device construction and to_empty().
        self._inv_freq_cpu = inv_freq  # [head_dim // 2] float32
        self.max_positions = max_position_embeddings
        self._table: Optional[torch.Tensor] = None

    def reserve(self, max_positions: int) -> None:
        if max_positions > self.max_positions:
            self.max_positions = max_positions
            self._table = None

    def table(self, device: torch.device) -> torch.Tensor:
        if self._table is None or self._table.device != device:
            self._table = reference.build_cos_sin_cache(self._inv_freq_cpu.to(device), self.max_positions,
                                                        self.attention_scaling)
        return self._table

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, type={self.rope_type}, base={self.base}, positions={self.max_positions}"
