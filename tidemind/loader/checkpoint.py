"""Hugging Face-format checkpoint directories: config.json + *.safetensors -> a model on a device.

The model is built on the meta device (no memory, no init time), materialized empty on the target
device in the target dtype, then filled tensor by tensor from memory-mapped safetensors files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from ..config import ModelConfig
from ..layers.context import BuildContext
from ..layers.linear import restore_fixed_dtypes
from ..layers.quantization import QuantizationConfig, quantization_from_hf_config
from ..models.registry import get_model_class, supported_architectures
from .config_check import GENERATION_CONFIG_KEYS, check_config_values
from .errors import CheckpointError
from .prefused import check_version, is_prefused, load_prefused

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
TO_SAFETENSORS_HINT = ("convert it once with: python -c \"from transformers import AutoModelForCausalLM as M; "
                       "M.from_pretrained('{path}').save_pretrained('{path}-safetensors')\" and load that directory")


def _read_json(path: str) -> dict:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                              f"JSON files must be UTF-8: save it as UTF-8, or restore the model's original "
                              f"file") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); fix or re-download the file") from None


def check_model_dir(path: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"model path {path!r} does not exist; pass a directory holding config.json "
                                f"and *.safetensors, a .gguf file, or a bundled model name")
    if not os.path.isdir(path):
        raise CheckpointError(f"{path!r} is a file, not a model directory; for a .gguf file call "
                              f"tidemind.loader.resolve_model({path!r}) first, it converts the file")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path!r} has no config.json; a Hugging Face-format model directory needs "
                                f"config.json next to its *.safetensors (copy it from the model's repository)")


def read_hf_config(path: str) -> dict:
    """config.json of a model directory, its value types checked (CheckpointError names the key)."""
    check_model_dir(path)
    config_path = os.path.join(path, "config.json")
    config = _read_json(config_path)
    check_config_values(config, config_path)
    return config


def safetensors_files(path: str) -> List[str]:
    """The checkpoint's weight files: those of model.safetensors.index.json, else every *.safetensors."""
    index_path = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        shards = sorted(set(_read_json(index_path).get("weight_map", {}).values()))
        missing = [shard for shard in shards if not os.path.isfile(os.path.join(path, shard))]
        if missing:
            raise CheckpointError(f"{SAFETENSORS_INDEX} in {path!r} lists shards that are not there: "
                                  f"{', '.join(missing)}; download the missing files")
        if shards:
            return [os.path.join(path, shard) for shard in shards]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if files:
        return files
    others = [f for f in sorted(os.listdir(path)) if f.endswith((".bin", ".pt", ".pth", ".gguf"))]
    if others:
        raise CheckpointError(f"{path!r} has no *.safetensors files, only {', '.join(others[:4])}; tidemind reads "
                              f"weights from safetensors only (a .gguf file can be passed directly); "
                              + TO_SAFETENSORS_HINT.format(path=path))
    raise CheckpointError(f"{path!r} has no *.safetensors weight files; download the model's *.safetensors "
                          f"into it")


def _tensor_names(files: List[str]) -> Dict[str, List[str]]:
    names = {}
    for file in files:
        try:
            with safe_open(file, framework="pt", device="cpu") as f:
                names[file] = list(f.keys())
        except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
            raise CheckpointError(f"cannot read {file}: {exc}; the file is corrupt or truncated, "
                                  f"download or export it again") from None
    return names


def iter_safetensors(files: List[str], desc: str = "Loading weights") -> Iterator[Tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor of the files, memory-mapped, with a progress bar."""
    names = _tensor_names(files)
    with tqdm(total=sum(len(n) for n in names.values()), desc=desc, unit="tensor", leave=False) as bar:
        for file, file_names in names.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in file_names:
                    try:
                        tensor = f.get_tensor(name)
                    except Exception as exc:
                        raise CheckpointError(f"cannot read tensor {name!r} from {file}: {exc}; the file is "
                                              f"corrupt or truncated, download or export it again") from None
                    yield name, tensor
                    bar.update(1)


def _ids(value) -> Tuple[int, ...]:
    return tuple(int(v) for v in value) if isinstance(value, (list, tuple)) else (int(value),)


def _with_generation_config(path: str, config: ModelConfig) -> ModelConfig:
    gen_path = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gen_path):
        return config
    gen = _read_json(gen_path)
    check_config_values(gen, gen_path, GENERATION_CONFIG_KEYS)
    changes = {}
    if gen.get("eos_token_id") is not None:
        changes["eos_token_ids"] = _ids(gen["eos_token_id"])
    if gen.get("bos_token_id") is not None:
        changes["bos_token_id"] = int(gen["bos_token_id"])
    return dataclasses.replace(config, **changes)


def model_class_for(hf_config: dict, path: str) -> type:
    architectures = hf_config.get("architectures") or []
    if not architectures:
        raise CheckpointError(f"config.json in {path!r} has no 'architectures' entry; add one, e.g. "
                              f"\"architectures\": [\"LlamaForCausalLM\"] (supported: "
                              f"{', '.join(supported_architectures())})")
    return get_model_class(architectures[0])


def model_head_dim(path: str) -> int:
    """The attention head size of the model in `path`, read from its config.json before loading."""
    hf_config = read_hf_config(path)
    return model_class_for(hf_config, path).model_config(hf_config).head_dim


def _build_on_meta(model_cls: type, hf_config: dict, config_path: str, ctx: Optional[BuildContext]) -> torch.nn.Module:
    """The model, its parameters on the meta device. Building reads config.json's values only, so
    whatever fails in it is about that file, and the error says so (check_config_values caught the
    common cases with a more precise message already)."""
    try:
        with torch.device("meta"):
            return model_cls(hf_config, ctx)
    except ValueError as exc:
        raise CheckpointError(f"{config_path}: {exc}") from exc
    except (TypeError, KeyError, IndexError, ZeroDivisionError) as exc:
        raise CheckpointError(f"{config_path}: cannot build {model_cls.__name__} from it ({type(exc).__name__}: "
                              f"{exc}); a value there is missing or of the wrong form: compare it with the model's "
                              f"original config.json") from exc


def quantization_of(hf_config: dict, path: str, model_format: Optional[str] = None) -> Optional[QuantizationConfig]:
    """The checkpoint's quantization, from config.json's quantization_config (None: dense), checked
    against model_format (None: whatever the checkpoint records; see quantization_from_hf_config)."""
    where = os.path.join(path, "config.json")
    if hf_config.get("quantization_config") is None and os.path.isfile(os.path.join(path, "quantize_config.json")):
        raise CheckpointError(f"{path!r} has a quantize_config.json but {where} has no quantization_config; "
                              f"tidemind reads the method from config.json only: copy the settings into it as "
                              f"\"quantization_config\" with a \"quant_method\" (e.g. \"gptq\")")
    return quantization_from_hf_config(hf_config, model_format, where=where)


def read_quantization(path: str, model_format: Optional[str] = None) -> Optional[QuantizationConfig]:
    """quantization_of() for a model directory (what the runner puts into its BuildContext)."""
    return quantization_of(read_hf_config(path), path, model_format)


def _context_for(ctx: Optional[BuildContext], quantization: Optional[QuantizationConfig], path: str) -> BuildContext:
    ctx = ctx or BuildContext()
    if ctx.quantization is None and quantization is not None:
        return dataclasses.replace(ctx, quantization=quantization)
    if ctx.quantization != quantization:
        recorded = quantization.describe() if quantization is not None else "no quantization"
        raise CheckpointError(f"the build context asks for {ctx.quantization.describe()} but {path!r} records "
                              f"{recorded}; build the context from the checkpoint (read_quantization)")
    return ctx


def check_tensor_parallel(path: str, tp: int, model_format: Optional[str] = None) -> None:
    """Raise (naming the config.json value and the tp values that would work) unless the model in
    `path` splits over tp ranks: builds rank 0's slice on the meta device, which checks head counts,
    intermediate sizes and quantization group sizes against tp without loading a weight."""
    from ..layers.parallel import ShapeOnlyTPGroup

    hf_config = read_hf_config(path)
    ctx = BuildContext(quantization=quantization_of(hf_config, path, model_format),
                       tp_group=ShapeOnlyTPGroup(0, tp))
    _build_on_meta(model_class_for(hf_config, path), hf_config, os.path.join(path, "config.json"), ctx)


def process_weights_after_loading(model: torch.nn.Module) -> None:
    """Let every layer's method repack its loaded weights for the device's kernels, then the model
    prepare what depends on them (its after_weights_processed, where it has one)."""
    for module in model.modules():
        method = module.__dict__.get("linear_method")
        if method is not None:
            method.process_weights_after_loading(module)
    after = getattr(model, "after_weights_processed", None)
    if after is not None:
        after()


def load_model(path: str, dtype: torch.dtype, device: torch.device, ctx: Optional[BuildContext] = None,
               model_format: Optional[str] = None) -> Tuple[torch.nn.Module, ModelConfig]:
    """(model on `device` in `dtype`, eval mode; its ModelConfig) from a Hugging Face-format directory.
    ``ctx``: the kernels and attention backend its layers use (default: the torch reference); its
    quantization comes from the checkpoint's quantization_config (model_format: see
    quantization_from_hf_config)."""
    start = time.perf_counter()
    hf_config = read_hf_config(path)
    model_cls = model_class_for(hf_config, path)
    ctx = _context_for(ctx, quantization_of(hf_config, path, model_format), path)
    files = safetensors_files(path)
    model = _build_on_meta(model_cls, hf_config, os.path.join(path, "config.json"), ctx)
    model = model.to(dtype=dtype)
    restore_fixed_dtypes(model)  # packed ints and fp16 scales keep their dtype
    model.to_empty(device=device)
    weights = iter_safetensors(files, desc=f"Loading {os.path.basename(os.path.abspath(path))}")
    if is_prefused(hf_config):  # written by `tidemind convert`: tensors are the parameters already
        check_version(hf_config, path)
        load_prefused(model, weights, path)
    else:
        model.load_weights(weights)
    process_weights_after_loading(model)
    model.eval()
    model_config = _with_generation_config(path, model.config)
    quant = f", {ctx.quantization.describe()}" if ctx.quantization is not None else ""
    logger.info("loaded %s (%s%s) from %s in %.1f s: %s on %s", model_config.architecture,
                f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params", quant, path,
                time.perf_counter() - start, dtype, device)
    return model, model_config
