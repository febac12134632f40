"""The measured ceilings of the device a benchmark runs on, so that figures are shares of them.

    copy_GBps   bytes read + written per second by a large device-to-device copy (GPU: 1 GiB,
                median of 10, timed with CUDA events; CPU: cpu_ceilings.measure_cpu_ceilings)
The batch-1 decode roofline is copy_GBps / the bytes of the weights one step reads.
"""
from __future__ import annotations

import statistics

import torch

from .cpu_ceilings import measure_cpu_ceilings, step_weight_bytes, step_weight_count


def measure_copy_bandwidth(device: torch.device) -> float:
    """GB/s (1e9 bytes) read + written by a device-to-device copy."""
    if device.type != "cuda":
        return measure_cpu_ceilings()["copy_GBps"]
    src = torch.randn(2**28, device=device)  # 1 GiB of float32, random (zeros can run faster)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * src.numel() * src.element_size() / statistics.median(times) / 1e9


def decode_roofline(model: torch.nn.Module, copy_gbps: float) -> dict:
    """The batch-1 decode roofline of a model: tokens/s if every step only streamed its weights."""
    step_bytes = step_weight_bytes(model)
    return {"copy_GBps": round(copy_gbps, 1), "step_weight_bytes": step_bytes,
            "step_weights": step_weight_count(model),
            "roofline_tok_s": round(copy_gbps * 1e9 / step_bytes, 2)}
