"""Give the host heap's free memory back to the OS while the engine is idle.

A long, varied load leaves glibc's heap at its high-water mark: the peak of a burst of large step
tensors (logits, a long prefill's activations) stays resident after they are freed, because glibc
returns only the top of the heap and raises its mmap threshold as large blocks are freed. RSS then
creeps up with every new peak although nothing leaks (RELIABILITY.md, soak). `malloc_trim(0)` gives
every free page back; it walks the heap (milliseconds), so the engine calls it once per idle spell,
never between steps. Fixing the mmap threshold instead (mallopt) cost about a third of CPU decode
speed in a measurement: every step's large tensors were then page-faulted in anew. (The other
source of creep, oneDNN's primitive cache, is bounded in runner/dense_backend.py.)
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Callable, Optional

IDLE_BEFORE_TRIM_S = 1.0  # of no work before the heap is trimmed (once per idle spell)


def _find_malloc_trim() -> Optional[Callable[[int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None  # glibc's; musl has none
    except OSError:
        return None


_malloc_trim = _find_malloc_trim()


def trim_host_heap() -> bool:
    """Return the heap's free pages to the OS; False where the C library cannot."""
    if _malloc_trim is None:
        return False
    _malloc_trim(0)
    return True

