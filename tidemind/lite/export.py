"""Writing a quantized checkpoint: one safetensors shard per decoder layer (plus one for the
embedding, final norm and LM head), an index, config.json with the quantization_config, and the
source's tokenizer and generation files. config.json is written last, so a directory whose
config.json records the quantization holds a complete checkpoint.

Tensors are named as in the source checkpoint: merged layers are split back into their
projections (qkv_proj -> q_proj, k_proj, v_proj) along each tensor's output dim, as its
ParamLayout says (packed or not), so that other tools read the result.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
from typing import Callable, Dict, Optional, Tuple

import torch
from safetensors.torch import save_file
from torch import nn

from ..layers.linear import BIAS, Linear, MergedLinear, ParamLayout
from ..layers.quantization.base import QuantizationConfig
from ..loader.checkpoint import SAFETENSORS_INDEX
from ..models.weights import NameMapper

# The dtype of every tensor kept in floating point (norms, embeddings, biases); float16 as AutoAWQ
# writes, so that other tools read the checkpoint as they read theirs.
SAVE_DTYPE = torch.float16
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_NOT_COPIED = ("config.json", SAFETENSORS_INDEX)

# (weight [out, in] float32) -> {leaf name: (tensor, layout of its output dim)}
LinearQuantizer = Callable[[torch.Tensor], Dict[str, Tuple[torch.Tensor, ParamLayout]]]


def split_shards(module: nn.Module, prefix: str, leaves: Dict[str, Tuple[torch.Tensor, ParamLayout]],
                 mapper: NameMapper) -> Dict[str, torch.Tensor]:
    """{checkpoint name: tensor} of one layer's tensors, merged outputs split per projection."""
    shards = module.shard_offsets().items() if isinstance(module, MergedLinear) else [(None, (0, module.output_size))]
    out = {}
    for shard, (offset, size) in shards:
        for leaf, (tensor, layout) in leaves.items():
            part = tensor
            if shard is not None:
                start, length = layout.shard_slice(offset, size)
                part = tensor.narrow(layout.output_dim, start, length)
            out[mapper.to_checkpoint(f"{prefix}.{leaf}", shard)] = part.contiguous().cpu()
    return out


def layer_tensors(layer: nn.Module, prefix: str, quantize: LinearQuantizer, mapper: NameMapper
                  ) -> Dict[str, torch.Tensor]:
    """{checkpoint name: tensor} of a decoder layer: its linear layers through `quantize`, every
    other parameter (norms) as it is, in SAVE_DTYPE."""
    out = {}
    for name, module in layer.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if isinstance(module, Linear):
            leaves = quantize(module.weight.detach().float())
            if module.bias is not None:
                leaves["bias"] = (module.bias.detach().to(SAVE_DTYPE), BIAS)
            out.update(split_shards(module, full, leaves, mapper))
            continue
        for leaf, param in module.named_parameters(recurse=False):
            out[mapper.to_checkpoint(f"{full}.{leaf}", None)] = param.detach().to(SAVE_DTYPE).cpu().contiguous()
    return out


def dense_tensors(modules: Dict[str, nn.Module], mapper: NameMapper) -> Dict[str, torch.Tensor]:
    """{checkpoint name: tensor} of unquantized modules by name (embedding, final norm, LM head)."""
    return {mapper.to_checkpoint(f"{prefix}.{leaf}", None): param.detach().to(SAVE_DTYPE).cpu().contiguous()
            for prefix, module in modules.items() for leaf, param in module.named_parameters()}


class CheckpointWriter:
    def __init__(self, work_dir: str, num_shards: int):
        self.work_dir = work_dir
        self.num_shards = num_shards
        self.written = 0
        self.weight_map: Dict[str, str] = {}
        os.makedirs(work_dir, exist_ok=True)
        if os.path.exists(os.path.join(work_dir, "config.json")):
            os.remove(os.path.join(work_dir, "config.json"))  # the directory is incomplete until finish()

    def write(self, tensors: Dict[str, torch.Tensor]) -> None:
        self.written += 1
        name = f"model-{self.written:05d}-of-{self.num_shards:05d}.safetensors"
        save_file(tensors, os.path.join(self.work_dir, name), metadata={"format": "pt"})
        self.weight_map.update({key: name for key in tensors})

    def finish(self, source_dir: str, hf_config: dict, quantization: Optional[QuantizationConfig]) -> None:
        if self.written != self.num_shards:
            raise RuntimeError(f"wrote {self.written} of {self.num_shards} shards")
        kept = set(self.weight_map.values())
        for path in glob.glob(os.path.join(self.work_dir, "*.safetensors")):
            name = os.path.basename(path)
            if (_SHARD.match(name) or name == "model.safetensors") and name not in kept:
                os.remove(path)  # a shard of an earlier run into the same directory
        total = sum(os.path.getsize(os.path.join(self.work_dir, name)) for name in kept)
        with open(os.path.join(self.work_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": self.weight_map}, f, indent=1)
        for name in os.listdir(source_dir):
            path = os.path.join(source_dir, name)
            if os.path.isfile(path) and not name.endswith(".safetensors") and name not in _NOT_COPIED:
                shutil.copy(path, os.path.join(self.work_dir, name))
        config = dict(hf_config)
        config.pop("dtype", None)
        config["torch_dtype"] = str(SAVE_DTYPE).replace("torch.", "")
        if quantization is not None:
            config["quantization_config"] = quantization.to_hf()
        with open(os.path.join(self.work_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
