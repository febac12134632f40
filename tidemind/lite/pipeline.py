"""The loop every `tidemind lite` command runs: calibration windows through the model layer by
layer (layerwise.py), each layer's input statistics observed, then the command's job applied to
the layer (scale / smooth it in place) and the layer quantized and written out before the next
one is loaded.

    work_dir/inputs_stats.pth   {"absmax" | "absmean" | "min" | "max": {linear name: [in_features]}},
                                the inputs of every linear layer over all calibration tokens
                                (names as in the model: model.layers.0.self_attn.qkv_proj)
    work_dir/calibration.json   the settings and sources of the run
    work_dir/*.safetensors, config.json, ...   the quantized checkpoint (auto_awq, smooth_quant)
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Optional

import torch
from tqdm.auto import tqdm

from ..chat.tokenizer import Tokenizer
from ..layers.quantization.base import QuantizationConfig
from .data import calibration_windows, load_text
from .export import CheckpointWriter, LinearQuantizer, dense_tensors, layer_tensors
from .layerwise import LayerRunner, LayerwiseModel
from .observers import STAT_NAMES, observe_inputs

logger = logging.getLogger("tidemind")

STATS_FILE = "inputs_stats.pth"


@dataclass(frozen=True)
class CalibrationSettings:
    dataset: str = "war-and-peace"
    num_samples: int = 128
    seq_len: int = 2048
    batch_size: int = 1
    # input rows (token positions) kept per linear layer for AWQ's searches (statistics use every
    # token): each searched scale costs 20 passes of these rows through its linears (and the MLP),
    # about 0.4 TFLOP a layer of SmolLM2 at 2048 rows; that keeps a CPU run practical
    search_rows: int = 2048
    seed: int = 0


@dataclass
class LiteJob:
    """What a command does with each layer: process (in place, given the observers) then quantize."""

    name: str
    quantization: Optional[QuantizationConfig] = None  # None: calibration only, nothing written
    quantizer: Optional[LinearQuantizer] = None
    process: Optional[Callable] = None  # (layer, observers) -> None
    needs_calibration: bool = True
    keep_rows: bool = False


@dataclass
class LiteResult:
    work_dir: str
    seconds: Dict[str, float] = field(default_factory=dict)
    num_tokens: int = 0


def _windows(model_path: str, calib: CalibrationSettings) -> torch.Tensor:
    text, source = load_text(calib.dataset)
    tokenizer = Tokenizer.from_pretrained(model_path)
    ids = tokenizer.encode(text, add_bos=False)
    logger.info("calibration text: %s, %d tokens", source, len(ids))
    return calibration_windows(ids, tokenizer.encode("", add_bos=True), calib.num_samples, calib.seq_len, calib.seed)


def _row_picker(observers, sample: torch.Tensor, seq_len: int, device: torch.device):
    """on_batch for LayerRunner.run: tell the observers which rows of samples [start, stop) to keep."""
    def pick(start: int, stop: int) -> None:
        inside = sample[(sample >= start * seq_len) & (sample < stop * seq_len)] - start * seq_len
        for obs in observers.values():
            obs.row_index = inside.to(device)
    return pick


@torch.no_grad()
def run_lite(model_path: str, work_dir: str, job: LiteJob, calib: CalibrationSettings,
             device: torch.device) -> LiteResult:
    result = LiteResult(work_dir=work_dir)
    start = time.perf_counter()
    lw = LayerwiseModel(model_path, device)
    rest = lw.load_rest()
    num_layers = len(lw.layers)
    states = runner = sample = None
    if job.needs_calibration:
        windows = _windows(model_path, calib)
        result.num_tokens = windows.numel()
        states = lw.model.model.embed_tokens(windows.to(device)).float()  # [samples, seq_len, hidden]
        runner = LayerRunner(lw.model, calib.seq_len, calib.batch_size, device)
        gen = torch.Generator().manual_seed(calib.seed)
        sample = torch.randperm(windows.numel(), generator=gen)[:calib.search_rows].sort().values
    writer = CheckpointWriter(work_dir, num_layers + 1) if job.quantization is not None else None
    stats: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in STAT_NAMES}
    result.seconds["load"] = time.perf_counter() - start
    for index in tqdm(range(num_layers), desc=f"{job.name}: layers", unit="layer"):
        layer = lw.load_layer(index)
        prefix = f"model.layers.{index}"
        if job.needs_calibration:
            with observe_inputs(layer, keep_rows=job.keep_rows) as observers:
                runner.run(layer, states, _row_picker(observers, sample, calib.seq_len, device))
            for name, obs in observers.items():
                for stat, value in obs.stats().items():
                    stats[stat][f"{prefix}.{name}"] = value
            if job.process is not None:
                job.process(layer, observers)
        if writer is not None:
            writer.write(layer_tensors(layer, prefix, job.quantizer, lw.mapper))
        lw.release(layer)
    result.seconds["layers"] = time.perf_counter() - start - result.seconds["load"]
    os.makedirs(work_dir, exist_ok=True)
    if job.needs_calibration:
        torch.save(stats, os.path.join(work_dir, STATS_FILE))
    if writer is not None:
        names = ["model.embed_tokens", "model.norm", "lm_head"][:len(rest)]
        writer.write(dense_tensors(dict(zip(names, rest)), lw.mapper))
        writer.finish(model_path, lw.hf_config, job.quantization)
    with open(os.path.join(work_dir, "calibration.json"), "w") as f:
        json.dump({"command": job.name, "model": model_path, "calibration": asdict(calib) if job.needs_calibration
                   else None, "tokens": result.num_tokens,
                   "quantization_config": job.quantization.to_hf() if job.quantization else None,
                   "seconds": {k: round(v, 1) for k, v in result.seconds.items()}}, f, indent=2)
    result.seconds["total"] = time.perf_counter() - start
    return result
