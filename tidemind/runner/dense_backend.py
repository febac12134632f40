"""How unquantized linear layers multiply: "torch" (F.linear) or "onednn" (CPU float32 weights
packed once into oneDNN's blocked layout). "auto" is resolved once, at start-up."""
from __future__ import annotations

import logging

import torch
from torch import nn

from ..layers.embedding import LMHead
from ..layers.linear import Linear, OneDNNPackedLinearMethod, UnquantizedLinearMethod

logger = logging.getLogger("tidemind")

DENSE_BACKENDS = ("torch", "onednn")


def resolve_dense_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    if name not in ("auto",) + DENSE_BACKENDS:
        raise ValueError(f"dense backend {name!r} is not one of auto, {', '.join(DENSE_BACKENDS)}")
    onednn_ok = (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
                 and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    if name == "onednn" and not onednn_ok:
        raise ValueError("the onednn dense backend needs the CPU, float32 and a torch built with oneDNN")
    if name == "auto":
        return "onednn" if onednn_ok else "torch"
    return name


def apply_dense_backend(model: nn.Module, backend: str) -> None:
    """Switch every unquantized Linear (and the LM head) to `backend`; call after loading weights."""
    if backend != "onednn":
        return
    method = OneDNNPackedLinearMethod()
    for module in model.modules():
        if isinstance(module, Linear) and type(module.linear_method) is UnquantizedLinearMethod:
            module.linear_method = method
            method.process_weights_after_loading(module)
        elif isinstance(module, LMHead):
            module.pack(method.PACK_FOR_BATCH)
