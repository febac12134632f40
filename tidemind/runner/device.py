"""Resolve the "auto" device and dtype once, at start-up."""
from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import torch

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but torch sees no CUDA device: use --device cpu, "
                         "or install a CUDA build of torch")
    return torch.device(name)


def resolve_dtype(name: str, checkpoint_dtype: Optional[str], device: torch.device) -> torch.dtype:
    """`auto`: float32 on the CPU (no fast half-precision matmul there); on a GPU the checkpoint's
    half dtype, bfloat16 when it has none (float32 or quantized GGUF checkpoints)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    if checkpoint_dtype == "float16":
        return torch.float16
    return torch.bfloat16


def checkpoint_dtype(model_dir: str) -> Optional[str]:
    """config.json's torch_dtype / dtype, e.g. "bfloat16" (None when it names none)."""
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        hf_config = json.load(f)
    dtype = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return dtype if isinstance(dtype, str) else None


def to_device(data: Sequence, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A host list as a tensor on ``device``, copied without making the host wait for the device.

    A plain ``torch.tensor(data, device="cuda")`` synchronizes with the stream (it would wait for
    the model's kernels); a pinned buffer and a non-blocking copy do not.
    """
    return from_host(torch.tensor(data, dtype=dtype), device)


def from_host(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``, copied as to_device does."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)
