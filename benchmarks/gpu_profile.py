"""Where a step's time goes on the GPU: device busy time against wall time, the top kernels, and the
host time of the engine's phases, for D1-like decode (batch 1) and a batch-256 decode.

    python benchmarks/gpu_profile.py MODEL_DIR        # appends to $OUT/results.jsonl, prints tables

Each case runs in the overlapped loop (the GPU default: the host's work of one step beside the
device's work of the other) and in the plain loop (overlap_schedule off: the host's work between
the device's steps).

For each case: the steps' wall time (Engine.step), the host time of schedule / prepare_step /
the rest, and, from torch.profiler, the device's busy time (union of kernel intervals) per step and
the kernels that take most of it. Wall minus busy is time the device waited for the host.
CPU dry run: BENCH_DEVICE=cpu PROFILE_STEPS=4 python benchmarks/gpu_profile.py SMALL_MODEL_DIR.
"""
from __future__ import annotations

import collections
import json
import os
import sys
import time

import torch

from tidemind import EngineConfig, GenerationConfig
from tidemind.bench.host_timers import timed
from tidemind.bench.workloads import random_prompt
from tidemind.engine.engine import Engine
from tidemind.runner import step_inputs
from tidemind.runner.kernel_profile import busy_seconds, kernel_totals

STEPS = int(os.environ.get("PROFILE_STEPS", 64))
DEVICE = os.environ.get("BENCH_DEVICE", "cuda")


def record(**fields) -> None:
    fields.setdefault("time", time.strftime("%Y-%m-%dT%H:%M:%S"))
    line = json.dumps(fields)
    print("RESULT", line, flush=True)
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "results.jsonl"), "a") as f:
        f.write(line + "\n")


def profile_decode(engine: Engine, batch: int, label: str) -> None:
    """Fill `batch` sequences with 128-token prompts, then profile STEPS decode-only steps."""
    vocab = engine.model_config.vocab_size
    gen = GenerationConfig(max_new_tokens=2 * STEPS + 40, ignore_eos=True)
    for i in range(batch):
        prompt = [(t + 7 * i) % vocab for t in random_prompt(vocab)]
        engine.add_request(10_000_000 + 1000 * batch + i, prompt, gen)
    while engine.scheduler.num_waiting or any(r.num_computed_tokens < r.num_tokens - 1
                                              for r in engine.scheduler._running):
        engine.step()  # prefill, then a few decode steps to settle
    for _ in range(8):
        engine.step()
    totals = collections.defaultdict(float)
    scheduler = engine.scheduler
    originals = (scheduler.schedule, step_inputs.prepare_step)
    scheduler.schedule = timed(totals, "schedule", scheduler.schedule)
    step_inputs.prepare_step = timed(totals, "prepare_step", step_inputs.prepare_step)
    import tidemind.runner.model_runner as model_runner_module
    model_runner_module.prepare_step = step_inputs.prepare_step
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if DEVICE == "cuda" else [])
    try:
        # Wall and host phases without the profiler (it slows the host), then the device's side.
        start = time.perf_counter()
        for _ in range(STEPS):
            engine.step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(STEPS):
                engine.step()
            if DEVICE == "cuda":
                torch.cuda.synchronize()
    finally:
        scheduler.schedule, step_inputs.prepare_step = originals
        model_runner_module.prepare_step = originals[1]
    events = prof.events()
    busy = busy_seconds(events)
    kernels = kernel_totals(events, on_cuda=True)
    top = [(name[:60], round(us / STEPS, 1)) for name, us in kernels.most_common(12)]
    per_step = {"wall_ms": 1e3 * wall / STEPS, "device_busy_ms": 1e3 * busy / STEPS,
                "schedule_ms": 1e3 * totals["schedule"] / STEPS, "prepare_step_ms": 1e3 * totals["prepare_step"] / STEPS}
    record(system="tidemind", workload=f"profile-{label}", batch=batch, steps=STEPS, per_step=per_step,
           top_kernels_us_per_step=top, cmd="python benchmarks/gpu_profile.py " + " ".join(sys.argv[1:]))
    print(f"{label}: batch {batch}, per step {per_step}")
    for name, us in top:
        print(f"  {us:9.1f} us  {name}")
    for request_id in [r.request_id for r in list(scheduler._running) + list(scheduler._waiting)]:
        engine.abort_request(request_id)
    engine.step()


def main() -> None:
    """Both loops (engine.py): overlapped (the GPU default), then plain, each at batch 1 and 256."""
    model_dir = sys.argv[1]
    for overlap in (True, False):
        config = EngineConfig(session_len=int(os.environ.get("SESSION_LEN", 8192)), max_batch_size=256,
                              device=DEVICE, overlap_schedule=overlap)
        engine = Engine(model_dir, config)  # stepped in this thread: no AsyncEngine
        loop = "overlap" if overlap else "plain"
        try:
            profile_decode(engine, 1, f"decode-b1-{loop}")
            profile_decode(engine, 256, f"decode-b256-{loop}")
        finally:
            engine.close()


if __name__ == "__main__":
    main()
