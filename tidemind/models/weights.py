"""Checkpoint-name mapping and the weight-loading loop shared by every model class.

A model names its parameters after Hugging Face's (model.layers.0.self_attn.o_proj.weight) except
where projections are merged: q/k/v -> qkv_proj (shards "q", "k", "v"), gate/up -> gate_up_proj
(shards "gate", "up"). A NameMapper turns a checkpoint name into (parameter name, shard) and back, the
latter to name missing tensors in the checkpoint's own terms.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterable, List, Optional, Sequence, Set, Tuple

import torch
from torch import nn

from ..layers.linear import MergedLinear, ShardId, WeightShapeError, default_weight_loader

logger = logging.getLogger(__name__)

# Rules are (checkpoint part, parameter part[, shard]); a part starting with "^" only matches at
# the start of the name, any other part matches anywhere (first occurrence).
Rule = Tuple[str, str, Optional[ShardId]]

LLAMA_STACKED_RULES: Tuple[Rule, ...] = (
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
    (".gate_proj.", ".gate_up_proj.", "gate"),
    (".up_proj.", ".gate_up_proj.", "up"),
)


class MissingWeightsError(ValueError):
    """The checkpoint lacks tensors the model needs."""


def _replace(name: str, old: str, new: str) -> Optional[str]:
    if old.startswith("^"):
        return new[1:] + name[len(old) - 1:] if name.startswith(old[1:]) else None
    return name.replace(old, new, 1) if old in name else None


@dataclass
class NameMapper:
    rules: Sequence[Rule] = ()
    # checkpoint names containing one of these are not weights (e.g. rotary_emb.inv_freq buffers)
    ignore: Sequence[str] = ("rotary_emb.inv_freq",)

    def to_param(self, ckpt_name: str) -> Tuple[str, Optional[ShardId]]:
        for old, new, shard in self.rules:
            mapped = _replace(ckpt_name, old, new)
            if mapped is not None:
                return mapped, shard
        return ckpt_name, None

    def to_checkpoint(self, param_name: str, shard: Optional[ShardId]) -> str:
        for old, new, rule_shard in self.rules:
            if rule_shard == shard:
                mapped = _replace(param_name, new, old)
                if mapped is not None:
                    return mapped
        return param_name

    def ignored(self, ckpt_name: str) -> bool:
        return any(part in ckpt_name for part in self.ignore)


@dataclass
class LoadReport:
    loaded: Set[Tuple[str, Optional[ShardId]]] = field(default_factory=set)
    unexpected: List[str] = field(default_factory=list)


def expected_keys(model: nn.Module) -> Set[Tuple[str, Optional[ShardId]]]:
    """Every (parameter name, shard) the checkpoint must provide; merged layers need each shard."""
    keys = set()
    for name, _ in model.named_parameters():
        module = model.get_submodule(name.rpartition(".")[0])
        if isinstance(module, MergedLinear):
            keys.update((name, shard) for shard in module.shard_names)
        else:
            keys.add((name, None))
    return keys


def load_param(model: nn.Module, param_name: str, tensor: torch.Tensor, shard: Optional[ShardId],
               ckpt_name: str, report: LoadReport) -> None:
    """Copy one checkpoint tensor into its parameter (or its shard of a merged parameter)."""
    module_name, _, attr = param_name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        module = None
    param = getattr(module, attr, None) if module is not None else None
    if not isinstance(param, nn.Parameter):
        report.unexpected.append(ckpt_name)
        return
    loader = getattr(module, "weight_loader", default_weight_loader)
    try:
        loader(param, tensor, shard)
    except WeightShapeError as exc:
        raise WeightShapeError(f"checkpoint tensor {ckpt_name!r} (-> {param_name}): {exc}") from None
    if shard is None and isinstance(module, MergedLinear):
        report.loaded.update((param_name, s) for s in module.shard_names)
    elif isinstance(shard, int) and isinstance(module, MergedLinear):
        report.loaded.add((param_name, module.shard_names[shard]))
    else:
        report.loaded.add((param_name, shard))


def check_complete(model: nn.Module, report: LoadReport, mapper: NameMapper,
                   prefixes: Optional[Sequence[str]] = None) -> None:
    """Raise MissingWeightsError naming (in checkpoint terms) the tensors that never arrived
    (only those of parameters under `prefixes` when given: a model loaded part by part)."""
    if report.unexpected:
        shown = ", ".join(report.unexpected[:8])
        more = f" and {len(report.unexpected) - 8} more" if len(report.unexpected) > 8 else ""
        logger.warning("ignored %d checkpoint tensors the model has no parameter for: %s%s",
                       len(report.unexpected), shown, more)
    expected = expected_keys(model)
    if prefixes is not None:
        expected = {key for key in expected if key[0].startswith(tuple(prefixes))}
    missing = sorted(expected - report.loaded, key=lambda key: (key[0], str(key[1])))
    if missing:
        names = [mapper.to_checkpoint(name, shard) for name, shard in missing]
        shown = ", ".join(names[:10]) + (f" ... ({len(names)} in all)" if len(names) > 10 else "")
        raise MissingWeightsError(f"the checkpoint is missing {len(names)} weight tensors: {shown}. "
                                  f"Check that every shard listed in model.safetensors.index.json is present "
                                  f"and that config.json (num_hidden_layers, tie_word_embeddings, biases) "
                                  f"matches the checkpoint")


def load_checkpoint_weights(model: nn.Module, weights: Iterable[Tuple[str, torch.Tensor]], mapper: NameMapper,
                            expand=None, prefixes: Optional[Sequence[str]] = None) -> LoadReport:
    """The load loop: map names, copy tensors, then check completeness.

    expand(ckpt_name, tensor) -> [(param_name, shard, tensor)] or None lets a model unpack a
    tensor itself (InternLM2's packed wqkv); None falls back to the mapper. prefixes: load only
    the parameters under these names (the rest may stay on the meta device), e.g. one layer.
    """
    report = LoadReport()
    for ckpt_name, tensor in weights:
        if mapper.ignored(ckpt_name):
            continue
        targets = expand(ckpt_name, tensor) if expand is not None else None
        if targets is None:
            targets = [(*mapper.to_param(ckpt_name), tensor)]
        for param_name, shard, part in targets:
            load_param(model, param_name, part, shard, ckpt_name, report)
    check_complete(model, report, mapper, prefixes)
    return report
