"""Gated activations of the MLP: act(gate) * up on a merged [gate | up] projection."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.registry import REFERENCE_KERNELS, KernelSet

# config.json hidden_act / hidden_activation name -> the KernelSet field of its fused kernel
_GATED_ACTIVATIONS = {
    "silu": "silu_and_mul",
    "swish": "silu_and_mul",
    "gelu_pytorch_tanh": "gelu_tanh_and_mul",
    "gelu_tanh": "gelu_tanh_and_mul",
}


class GatedActivation(nn.Module):
    """forward: gate_up [num_tokens, 2 * intermediate] -> [num_tokens, intermediate]."""

    def __init__(self, name: str, kernels: KernelSet = REFERENCE_KERNELS):
        super().__init__()
        if name not in _GATED_ACTIVATIONS:
            raise ValueError(f"activation {name!r} is not supported; supported: "
                             f"{', '.join(sorted(_GATED_ACTIVATIONS))} (check hidden_act in config.json)")
        self.name = name
        self._fn = getattr(kernels, _GATED_ACTIVATIONS[name])

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self._fn(gate_up)

    def extra_repr(self) -> str:
        return self.name
