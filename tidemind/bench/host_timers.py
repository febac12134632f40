"""Wall-clock timers wrapped around functions, for the step profiles of benchmarks/
(cpu_step_profile.py, host_step_time.py, gpu_profile.py): where a step's host time goes."""
from __future__ import annotations

import time
from typing import Callable, Dict


def timed(totals: Dict[str, float], key: str, fn: Callable) -> Callable:
    """fn, adding the seconds each call takes to totals[key] (a defaultdict(float))."""
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        totals[key] += time.perf_counter() - start
        return out
    return wrapper
