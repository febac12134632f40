"""Gated activations of the MLP: act(gate) * up on a merged [gate | up] projection."""
from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from ..kernels import reference

# config.json hidden_act / hidden_activation name -> fused kernel taking [n, 2 * d] -> [n, d]
_GATED_ACTIVATIONS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": reference.silu_and_mul,
    "swish": reference.silu_and_mul,
    "gelu_pytorch_tanh": reference.gelu_tanh_and_mul,
    "gelu_tanh": reference.gelu_tanh_and_mul,
}


class GatedActivation(nn.Module):
    """forward: gate_up [num_tokens, 2 * intermediate] -> [num_tokens, intermediate]."""

    def __init__(self, name: str):
        super().__init__()
        if name not in _GATED_ACTIVATIONS:
            raise ValueError(f"activation {name!r} is not supported; supported: "
                             f"{', '.join(sorted(_GATED_ACTIVATIONS))} (check hidden_act in config.json)")
        self.name = name
        self._fn = _GATED_ACTIVATIONS[name]

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._fn(gate_up)

    def extra_repr(self) -> str:
        return self.name
