"""Resolve the "auto" device and dtype once, at start-up."""
from __future__ import annotations

import json
import os
from typing import Optional

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
