"""A model built on the meta device whose decoder layers are loaded from the memory-mapped
checkpoint one at a time, and run over all calibration windows before the next is loaded: a model
larger than memory calibrates with one layer (plus the hidden states) in memory.

    states [num_samples, seq_len, hidden] = embed(windows)
    for each layer i: load layer i -> run it over states batch by batch (hooks observe its linear
    layers' inputs) -> states = its output -> the caller transforms / quantizes / saves the layer
    -> release layer i

The residual stream is carried summed (hidden + residual): a layer called with residual=None
starts from exactly that sum. Everything computes in float32.
"""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from safetensors import safe_open
from torch import nn

from ..attention.base import layout_from_lists
from ..attention.kv_cache import LayerKVCache
from ..layers.context import BuildContext
from ..loader.checkpoint import model_class_for, read_hf_config, safetensors_files
from ..models.weights import load_checkpoint_weights

# Architectures whose checkpoint names map one-to-one onto the model's (q/k/v, gate/up merged by
# name rules), so quantized tensors can be written back under the names other tools read.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Gemma3ForCausalLM")
REST_PREFIXES = ("model.embed_tokens.", "model.norm.", "lm_head.")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_quantizable(path: str) -> dict:
    """config.json of a model `tidemind lite` can quantize; raises naming the problem otherwise."""
    hf_config = read_hf_config(path)
    arch = (hf_config.get("architectures") or ["(none)"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"tidemind lite quantizes {', '.join(SUPPORTED_ARCHITECTURES)}; {path!r} is {arch} "
                         f"(it may still run unquantized with tidemind chat / serve)")
    method = (hf_config.get("quantization_config") or {}).get("quant_method")
    if method:
        raise ValueError(f"{path!r} is already quantized (quant_method={method!r}); quantize the original "
                         f"unquantized model")
    return hf_config


class LayerwiseModel:
    def __init__(self, path: str, device: torch.device):
        self.path = path
        self.device = device
        self.hf_config = check_quantizable(path)
        with torch.device("meta"):
            self.model = model_class_for(self.hf_config, path)(self.hf_config, BuildContext())
        self.model.to(dtype=torch.float32)
        self.mapper = self.model.name_mapper()
        self.files = safetensors_files(path)
        self.names = self._names_by_layer()

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def _names_by_layer(self) -> Dict[Optional[int], List[Tuple[str, str]]]:
        """{layer index, or None for the rest: [(file, checkpoint name)]}."""
        names = defaultdict(list)
        for file in self.files:
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():
                    if self.mapper.ignored(name):
                        continue
                    match = _LAYER.search(name)
                    names[int(match.group(1)) if match else None].append((file, name))
        return names

    def _load(self, key: Optional[int], prefixes: Tuple[str, ...], modules: List[nn.Module]) -> None:
        for module in modules:
            module.to_empty(device=self.device)
        load_checkpoint_weights(self.model, self._read(key), self.mapper, expand=self.model.expand_weight,
                                prefixes=prefixes)

    def _read(self, key: Optional[int]) -> Iterator[Tuple[str, torch.Tensor]]:
        by_file = defaultdict(list)
        for file, name in self.names.get(key, []):
            by_file[file].append(name)
        for file, names in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for name in names:
                    yield name, f.get_tensor(name)

    def load_rest(self) -> List[nn.Module]:
        """Materialize the embedding, the final norm and the LM head (if not tied)."""
        modules = [self.model.model.embed_tokens, self.model.model.norm]
        if not self.model.lm_head.tied:
            modules.append(self.model.lm_head)
        self._load(None, REST_PREFIXES, modules)
        return modules

    def load_layer(self, index: int) -> nn.Module:
        layer = self.layers[index]
        self._load(index, (f"model.layers.{index}.",), [layer])
        return layer

    def release(self, module: nn.Module) -> None:
        module.to_empty(device="meta")


class LayerRunner:
    """Runs decoder layers over the calibration windows in batches of `batch_size` sequences, on a
    scratch paged KV cache of one block per sequence (block size = seq_len)."""

    def __init__(self, model: nn.Module, seq_len: int, batch_size: int, device: torch.device):
        config = model.config
        self.model = model
        self.seq_len = seq_len
        self.device = device
        # [2, batch, seq_len, kv_heads, head_dim]: every layer of the supported models has this shape
        self.kv_cache = torch.empty(2, batch_size, seq_len, config.num_kv_heads, config.head_dim,
                                    dtype=torch.float32, device=device)
        self._inputs: Dict[int, tuple] = {}

    def _step_inputs(self, batch: int):
        """(rope inputs, attention metadata) for `batch` sequences of seq_len tokens, built once."""
        if batch not in self._inputs:
            positions = torch.arange(self.seq_len, device=self.device).repeat(batch)
            layout = layout_from_lists([self.seq_len] * batch, [self.seq_len] * batch, [[i] for i in range(batch)],
                                       self.seq_len, self.device)
            self._inputs[batch] = (self.model.rope_inputs(positions),
                                   self.model.ctx.attention_backend.build_metadata(layout))
        return self._inputs[batch]

    @torch.no_grad()
    def run(self, layer: nn.Module, states: torch.Tensor, on_batch=None) -> None:
        """states [num_samples, seq_len, hidden] -> the layer's outputs, in place. on_batch(start,
        stop) is called before each batch of samples [start, stop) runs (observers pick rows)."""
        batch_size = self.kv_cache.shape[1]
        for start in range(0, states.shape[0], batch_size):
            stop = min(start + batch_size, states.shape[0])
            if on_batch is not None:
                on_batch(start, stop)
            rope, meta = self._step_inputs(stop - start)
            hidden = states[start:stop].reshape(-1, states.shape[-1])
            out, residual = layer(hidden, None, rope, LayerKVCache(self.kv_cache[:, :stop - start]), meta)
            states[start:stop] = (out + residual).view(stop - start, self.seq_len, -1)
