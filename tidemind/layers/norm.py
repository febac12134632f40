"""RMSNorm on top of the rms_norm / add_rms_norm kernels of the model's KernelSet."""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import nn

from ..kernels.registry import REFERENCE_KERNELS, KernelSet


class RMSNorm(nn.Module):
    """x / rms(x) * (weight + weight_offset), computed in float32.

    weight_offset is 0 for Llama-style checkpoints and 1 for Gemma, whose checkpoints store
    (scale - 1). forward(x) -> normed; forward(x, residual) -> (rms_norm(x + residual), x + residual),
    the fused residual step of a pre-norm block. x, residual: [num_tokens, hidden]. A kernel may
    reuse the memory of x and residual for its outputs: callers never read them again.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0,
                 kernels: KernelSet = REFERENCE_KERNELS):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight_offset = weight_offset
        self.kernels = kernels
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None
                ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        if residual is None:
            return self.kernels.rms_norm(x, self.weight, self.eps, self.weight_offset)
        return self.kernels.add_rms_norm(x, residual, self.weight, self.eps, self.weight_offset)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, weight_offset={self.weight_offset}"
