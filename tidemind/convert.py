"""`tidemind convert`: a model -> tidemind's pre-fused safetensors directory (loader/prefused.py).

The model is loaded once the usual way (names mapped, q/k/v and gate/up merged), then its
parameters are written as they stand, with the source's config.json (plus the format marker and
the stored dtype) and every tokenizer / generation file beside them. The directory is written under
a temporary name next to --dst-path and renamed into place at the end, so a directory that exists
is complete.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

logger = logging.getLogger("tidemind")

SHARD_BYTES = 4 * 2**30  # one safetensors file holds at most this much
# Files of a model directory that are weights or written anew: everything else is copied.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
_NOT_COPIED = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ConvertResult:
    dst_path: str
    num_tensors: int
    num_bytes: int
    dtype: str
    seconds: float


def _stored_dtype(dtype: str, hf_config: dict) -> str:
    """"auto": the checkpoint's own dtype (nothing is rounded), float32 when config.json names none."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"--dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
        return dtype
    recorded = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return recorded if recorded in _DTYPES else "float32"


def _shards(tensors: Dict[str, torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def _write_weights(tensors: Dict[str, torch.Tensor], directory: str) -> None:
    from safetensors.torch import save_file

    shards = _shards(tensors)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(directory, file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def _copy_side_files(source: str, directory: str) -> None:
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if os.path.isfile(path) and name not in _NOT_COPIED and not name.endswith(_NOT_COPIED_SUFFIXES):
            shutil.copy2(path, os.path.join(directory, name))


def _check_destination(dst_path: str, source: str) -> str:
    dst_path = os.path.abspath(os.path.expanduser(dst_path))
    if os.path.abspath(source) == dst_path:
        raise ValueError(f"--dst-path {dst_path} is the model's own directory: pick a new directory")
    if os.path.exists(dst_path) and (not os.path.isdir(dst_path) or os.listdir(dst_path)):
        raise FileExistsError(f"--dst-path {dst_path} exists and is not an empty directory: remove it or pick "
                              f"another path")
    os.makedirs(os.path.dirname(dst_path) or ".", exist_ok=True)
    return dst_path


def convert(model: Optional[str], dst_path: str, dtype: str = "auto", tp: int = 1) -> ConvertResult:
    """Write MODEL (a directory, a .gguf file or a bundled name) as a pre-fused directory. Tensors are
    stored whole (tensor-parallel ranks take their slices when they load it); tp > 1 checks that the
    model splits over that many ranks first."""
    from .loader.checkpoint import check_tensor_parallel, load_model, read_hf_config
    from .loader.prefused import FORMAT_KEY, format_marker, is_prefused
    from .loader.resolve import resolve_model

    start = time.perf_counter()
    resolved = resolve_model(model)
    hf_config = read_hf_config(resolved.path)
    if is_prefused(hf_config):
        raise ValueError(f"{model!r} is pre-fused already (written by `tidemind convert`): load it as it is")
    method = (hf_config.get("quantization_config") or {}).get("quant_method")
    if method:  # their layers repack weights once loaded: the loaded state is no checkpoint
        raise ValueError(f"{model!r} is quantized ({method}): `tidemind convert` writes dense checkpoints; load the "
                         f"quantized one as it is")
    dst_path = _check_destination(dst_path, resolved.path)
    if tp > 1:
        check_tensor_parallel(resolved.path, tp)
    stored = _stored_dtype(dtype, hf_config)
    loaded, _ = load_model(resolved.path, _DTYPES[stored], torch.device("cpu"))
    tensors = {name: param.detach().contiguous() for name, param in loaded.named_parameters()}
    tmp = tempfile.mkdtemp(prefix=f".tmp-{os.path.basename(dst_path)}-", dir=os.path.dirname(dst_path))
    try:
        logger.info("writing %d tensors (%s) to %s", len(tensors), stored, dst_path)
        _write_weights(tensors, tmp)
        config = {**hf_config, "torch_dtype": stored, FORMAT_KEY: format_marker(model or resolved.name)}
        config.pop("dtype", None)  # transformers 5's name for torch_dtype: one of them, not two that differ
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
        _copy_side_files(resolved.path, tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would keep the model from other users
        if os.path.isdir(dst_path):
            os.rmdir(dst_path)  # checked empty above
        os.rename(tmp, dst_path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    num_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return ConvertResult(dst_path, len(tensors), num_bytes, stored, time.perf_counter() - start)
