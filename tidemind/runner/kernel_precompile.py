"""Compile, side by side in threads, the Triton kernels that a piece of GPU work is about to launch.

On a machine whose Triton cache is empty, the CUDA graphs' warm-up runs compile every kernel
specialization they meet, one after the other: most of a first start-up after the weights (about
5.5 s of 15 on an H200, docs/GPU_NOTES.md). Triton compiles largely outside the GIL (LLVM and
ptxas), so these compiles can run at once:

1. run the work once with JITFunction.run replaced by a recorder: every launch is noted (kernel,
   arguments, launch options) and nothing reaches the device from Triton (the torch ops between
   the launches still run, on whatever the buffers hold; no launcher reads device data on the
   host, an engine invariant);
2. hand each noted launch to Triton's own warm-up path inside its AsyncCompileMode with a thread
   pool: it derives the specialization exactly as a launch would, drops duplicates by their cache
   key, compiles the rest in the pool and files each kernel where the real launch will look.

The work then runs for real and finds its kernels compiled. Where Triton has no AsyncCompileMode
(another version), nothing is precompiled and the work compiles as before.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Tuple

logger = logging.getLogger("tidemind")

_MAX_WORKERS = 32


def recorded_launches(work: Callable[[], object]) -> List[Tuple[object, tuple, dict]]:
    """[(JITFunction, args, keyword arguments without the grid)] of every Triton launch work() makes;
    none of them runs."""
    from triton.runtime.jit import JITFunction

    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    original = JITFunction.run
    JITFunction.run = record
    try:
        work()
    finally:
        JITFunction.run = original
    return launches


def precompile_kernels(work: Callable[[], object], workers: int = 0) -> Tuple[int, float]:
    """Compile the kernels work() launches, in up to `workers` threads (0: one per CPU core, at
    most 32). Returns (launches noted, seconds). work() itself is not run for real."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode
    except ImportError:  # a Triton without it: the real run compiles as it goes
        return 0, 0.0
    start = time.perf_counter()
    launches = recorded_launches(work)
    workers = workers or min(_MAX_WORKERS, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="triton-compile") as pool:
        with AsyncCompileMode(pool):  # on leaving: waits for every compile and files the kernels
            for kernel, args, kwargs in launches:
                kernel.run(*args, grid=None, warmup=True, **kwargs)
    return len(launches), time.perf_counter() - start
