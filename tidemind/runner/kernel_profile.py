"""Which device kernels a stretch of work ran, and for how long: torch.profiler's CUDA activity
(CUPTI; kernels replayed from CUDA graphs included), summed by kernel name.

Used by benchmarks (benchmarks/gpu_profile.py in one process; benchmarks/gpu_tp.py on every
tensor-parallel rank through Worker.start_profile / stop_profile). On the CPU it records the calling
thread's CPU operators instead, so a dry run of a benchmark still produces a table where that thread
runs the model (a worker rank does; an engine in its own thread does not).
"""
from __future__ import annotations

import collections
from typing import List, Optional

import torch


def busy_seconds(events) -> float:
    """Union of the device kernels' [start, end) intervals, in seconds."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")
    for s, e in spans:
        if s > end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    return busy / 1e6


def kernel_totals(events, on_cuda: bool) -> collections.Counter:
    """Microseconds by kernel name (the first 80 characters) over `events`."""
    totals: collections.Counter = collections.Counter()
    for e in events:
        if on_cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue
        totals[e.name[:80]] += getattr(e, "device_time_total", 0.0) if on_cuda else e.cpu_time_total
    return totals


class KernelProfile:
    """start(); ...work...; stop(top) -> {"busy_ms": device busy time, "kernels": [(name, us)]}:
    the `top` kernels by total time, largest first."""

    def __init__(self, device_type: str):
        self.on_cuda = device_type == "cuda"
        self._profiler: Optional[torch.profiler.profile] = None

    def start(self) -> None:
        if self._profiler is not None:
            raise RuntimeError("a kernel profile is already running")
        activity = torch.profiler.ProfilerActivity.CUDA if self.on_cuda else torch.profiler.ProfilerActivity.CPU
        self._profiler = torch.profiler.profile(activities=[activity])
        self._profiler.__enter__()

    def stop(self, top: int = 20) -> dict:
        if self._profiler is None:
            raise RuntimeError("no kernel profile is running")
        if self.on_cuda:
            torch.cuda.synchronize()
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        events = profiler.events()
        kernels: List = [(name, round(us, 1)) for name, us in kernel_totals(events, self.on_cuda).most_common(top)]
        return {"busy_ms": round(1e3 * busy_seconds(events), 3) if self.on_cuda else None, "kernels": kernels}
