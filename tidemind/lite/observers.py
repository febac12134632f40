"""Statistics of the inputs of a decoder layer's linear layers, gathered by forward pre-hooks
while the layer runs over the calibration windows.

Per linear layer and input channel: absmax, absmean, min, max over every calibration token
(what `lite calibrate` saves and SmoothQuant / AWQ scale from), plus a fixed sample of input rows
(the same token positions for every layer) that the AWQ searches evaluate their losses on.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

from ..layers.linear import Linear

STAT_NAMES = ("absmax", "absmean", "min", "max")


class InputObserver:
    def __init__(self, keep_rows: bool):
        self.keep_rows = keep_rows
        self.count = 0
        self.absmax: Optional[torch.Tensor] = None  # [in_features] float32
        self.abssum: Optional[torch.Tensor] = None
        self.min: Optional[torch.Tensor] = None
        self.max: Optional[torch.Tensor] = None
        self.rows: List[torch.Tensor] = []
        self.row_index: Optional[torch.Tensor] = None  # rows of the current batch to keep (set by the runner)

    def observe(self, x: torch.Tensor) -> None:
        xf = x.reshape(-1, x.shape[-1]).float()  # [tokens, in_features]
        absx = xf.abs()
        batch_max, batch_sum = absx.amax(0), absx.sum(0)
        batch_lo, batch_hi = xf.amin(0), xf.amax(0)
        if self.absmax is None:
            self.absmax, self.abssum, self.min, self.max = batch_max, batch_sum, batch_lo, batch_hi
        else:
            torch.maximum(self.absmax, batch_max, out=self.absmax)
            self.abssum += batch_sum
            torch.minimum(self.min, batch_lo, out=self.min)
            torch.maximum(self.max, batch_hi, out=self.max)
        self.count += xf.shape[0]
        if self.keep_rows and self.row_index is not None and self.row_index.numel():
            self.rows.append(xf.index_select(0, self.row_index))

    @property
    def absmean(self) -> torch.Tensor:
        return self.abssum / max(self.count, 1)

    def stats(self) -> Dict[str, torch.Tensor]:
        return {"absmax": self.absmax.cpu(), "absmean": self.absmean.cpu(), "min": self.min.cpu(),
                "max": self.max.cpu()}

    def sample(self) -> torch.Tensor:
        """[kept rows, in_features] float32: the inputs at the sampled token positions."""
        return torch.cat(self.rows) if self.rows else torch.empty(0, 0)


def linear_modules(layer: nn.Module) -> Dict[str, Linear]:
    """The layer's linear layers by name inside it ("self_attn.qkv_proj", ...)."""
    return {name: module for name, module in layer.named_modules() if isinstance(module, Linear)}


@contextmanager
def observe_inputs(layer: nn.Module, keep_rows: bool) -> Iterator[Dict[str, InputObserver]]:
    observers = {name: InputObserver(keep_rows) for name in linear_modules(layer)}
    handles = [module.register_forward_pre_hook(lambda _m, args, obs=observers[name]: obs.observe(args[0]))
               for name, module in linear_modules(layer).items()]
    try:
        yield observers
    finally:
        for handle in handles:
            handle.remove()
