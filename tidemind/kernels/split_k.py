"""K split across programs and reduced in the same launch, for the W4A16 kernels (w4a16_gemv.py,
w4a16_gemv_slabs.py, w4a16_gemm.py) whose output tiles alone are too few to fill the GPU; the
decode attention (decode_attention.py) merges its KV shares through the same arrival counters.

Each program of a tile's `splits` K shares writes its float32 partial sums to a scratch buffer
(partials [splits, ...]) and counts its arrival at the tile's counter (last_to_arrive); the last to
arrive adds the partials in split order (add_splits: deterministic), writes the output and resets
the counter to 0 for the next launch (reset_arrivals). The counters live in one zeroed int32 buffer
per device; the launches of a device run on one stream at a time (the engine's invariant), so no
two launches share a counter at once. How far K is split depends only on host values (shapes, SM
count), so launches can be captured in CUDA graphs.
"""
from __future__ import annotations

import functools
from typing import Dict

import torch
import triton
import triton.language as tl

MAX_SPLITS = 64
_CPU_SM_COUNT = 4  # stands in for the SM count under the Triton interpreter (CPU tensors)
COUNTERS = 1 << 14  # output tiles one launch may count arrivals for


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return _CPU_SM_COUNT
    return torch.cuda.get_device_properties(device).multi_processor_count


_counters: Dict[torch.device, torch.Tensor] = {}


def arrival_counters(device: torch.device, tiles: int, name: str) -> torch.Tensor:
    """The device's zeroed arrival counters (at least `tiles` of them), made on first use. Made
    outside a CUDA graph capture (a buffer made inside one would belong to that graph's memory
    pool): the engine runs every layer eagerly before it captures."""
    if tiles > COUNTERS:
        raise ValueError(f"{name}: {tiles} output tiles, more than the {COUNTERS} arrival counters")
    counters = _counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{name}: run it once outside CUDA graph capture first (its arrival counters "
                               f"are made on first use)")
        counters = _counters[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return counters


def splits_for(programs: int, most: int, device: torch.device, programs_per_sm: int) -> int:
    """How many K shares give programs_per_sm programs per SM when `programs` output tiles alone
    do not (1 when they do), at most `most` (the K tiles there are) and MAX_SPLITS."""
    wanted = programs_per_sm * sm_count(device)
    if programs >= wanted:
        return 1
    return max(1, min(triton.cdiv(wanted, programs), MAX_SPLITS, most))


@triton.jit
def last_to_arrive(counter_ptr, tile, splits):
    """After this program's partials are stored: count its arrival at `tile`; true for the last of
    the tile's splits to arrive (its partials and everyone else's are then visible to it)."""
    tl.debug_barrier()  # every thread's partials are written before the arrival is published
    arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")  # one thread; orders the stores
    return arrived == splits - 1


@triton.jit
def add_splits(partial_ptr, offsets, split_stride, splits, mask):
    """float32 sum over the splits of partial_ptr[s * split_stride + offsets], in split order."""
    total = tl.zeros_like(offsets).to(tl.float32)
    for s in range(0, splits):
        total += tl.load(partial_ptr + s * split_stride + offsets, mask=mask, other=0.0, cache_modifier=".cg")
    return total


@triton.jit
def reset_arrivals(counter_ptr, tile):
    tl.atomic_xchg(counter_ptr + tile, 0)  # ready for the next launch
