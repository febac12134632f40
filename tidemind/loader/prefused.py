"""tidemind's pre-fused checkpoint format (written by `tidemind convert`, loaded by load_model).

A pre-fused directory is a Hugging Face-format directory whose tensors already have the shapes and
names of tidemind's parameters, as they stand after loading: q/k/v merged into qkv_proj, gate/up into
gate_up_proj, prefixes and packed tensors (InternLM2's wqkv, Gemma 3's language_model.) resolved,
tied weights stored once. Its config.json is the source's plus

    "torch_dtype": the dtype the tensors are stored in,
    "tidemind_format": {"name": "prefused", "version": 1, "source": <the model converted>}

Loading it needs no name mapping and no shard copies: each tensor is its parameter. On the CPU, in
the stored dtype, the memory-mapped tensor itself becomes the parameter (the file's pages, read on
first use, private to the process: no copy at all); elsewhere it is copied once into place. A
tensor-parallel rank holds a slice of most parameters: its module's weight_loader cuts the stored
(whole) tensor to that slice, merged projections shard by shard.
"""
from __future__ import annotations

import logging
from typing import Dict, Iterable, Tuple

import torch
from torch import nn

from ..layers.linear import WeightShapeError, default_weight_loader
from .errors import CheckpointError

logger = logging.getLogger(__name__)

FORMAT_KEY = "tidemind_format"
FORMAT_NAME = "prefused"
FORMAT_VERSION = 1


def is_prefused(hf_config: dict) -> bool:
    marker = hf_config.get(FORMAT_KEY)
    return isinstance(marker, dict) and marker.get("name") == FORMAT_NAME


def format_marker(source: str) -> dict:
    return {"name": FORMAT_NAME, "version": FORMAT_VERSION, "source": source}


def check_version(hf_config: dict, path: str) -> None:
    version = hf_config[FORMAT_KEY].get("version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path!r} was written by `tidemind convert` in format version {version!r}; this "
                              f"tidemind reads version {FORMAT_VERSION}: convert the original model again")


def load_prefused(model: nn.Module, weights: Iterable[Tuple[str, torch.Tensor]], path: str) -> None:
    """Put every tensor of a pre-fused checkpoint in place as its parameter (see the module docstring)."""
    params: Dict[str, nn.Parameter] = dict(model.named_parameters())  # a tied weight appears once
    loaded = set()
    for name, tensor in weights:
        param = params.get(name)
        if param is None:
            raise CheckpointError(f"{path!r} holds tensor {name!r}, which the model has no parameter for: the "
                                  f"directory was converted from another model or by another tidemind version; "
                                  f"convert the original model again")
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if getattr(getattr(module, "tp", None), "size", 1) > 1:  # this rank's slice of the stored tensor
            try:
                getattr(module, "weight_loader", default_weight_loader)(param, tensor, None)
            except WeightShapeError as exc:
                raise CheckpointError(f"{path!r}: tensor {name!r}: {exc}; convert the original model again") from None
            loaded.add(name)
            continue
        if tuple(tensor.shape) != tuple(param.shape):
            raise CheckpointError(f"{path!r}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                                  f"{tuple(param.shape)}; convert the original model again")
        if param.device.type == "cpu" and tensor.dtype == param.dtype:
            setattr(module, attr, nn.Parameter(tensor, requires_grad=False))
        else:
            param.data.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"{path!r} lacks tensors the model needs: {shown}; the conversion did not finish "
                              f"or files are missing: convert the original model again")
