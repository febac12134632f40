"""What `tidemind bench latency` and `tidemind bench throughput` share: the model and engine
flags, the engine they start, the environment block of their JSON, and the table they print."""
from __future__ import annotations

import argparse
import platform
import sys
import time
from typing import Dict, List, Sequence

from ..config import EngineConfig
from ..config_flags import add_config_flags, config_from_args


def add_engine_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("model", nargs="?", default=None,
                        help="model directory, .gguf file or bundled name (default: the bundled SmolLM2)")
    parser.add_argument("--out", default=default_out, help="results path: OUT.json and OUT.png")
    parser.add_argument("--no-roofline", action="store_true",
                        help="skip measuring the device's copy bandwidth (the roofline shares)")
    parser.add_argument("--log-level", default="WARNING", help="logging level (INFO shows the engine's start-up)")
    add_config_flags(parser, EngineConfig, "engine")


def start_pipeline(args: argparse.Namespace):
    """(pipeline, seconds from start-up to ready)."""
    from ..api import pipeline

    start = time.perf_counter()
    pipe = pipeline(args.model, backend_config=config_from_args(EngineConfig, args), log_level=args.log_level)
    return pipe, time.perf_counter() - start


def environment(pipe, args: argparse.Namespace, startup_s: float) -> dict:
    """Versions, device, engine choices and (unless --no-roofline) the decode roofline."""
    import torch

    runner = getattr(pipe.engine.executor, "runner", None)
    env = {"command": "tidemind bench " + " ".join(sys.argv[2:]), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "python": platform.python_version(), "torch": torch.__version__, "model": pipe.engine.resolved.name,
           "engine": pipe.engine.executor.description, "startup_s": round(startup_s, 2),
           "kv_cache_tokens": pipe.engine.kv_spec.num_tokens}
    if runner is not None:
        device = runner.device
        env["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
        if not args.no_roofline:
            from .device_ceilings import decode_roofline, measure_copy_bandwidth

            env["roofline"] = decode_roofline(runner.model, measure_copy_bandwidth(device))
    return env


def print_table(title: str, rows: Sequence[Dict[str, object]]) -> None:
    """A plain text table: one row per dict, columns from the first row's keys."""
    if not rows:
        return
    columns: List[str] = list(rows[0])
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print(title)
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for r in cells:
        print("  ".join(v.rjust(w) for v, w in zip(r, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return "" if value is None else str(value)
