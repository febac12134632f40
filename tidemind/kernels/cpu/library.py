"""Loading the CPU kernel library and choosing its instruction set, once per process.

The library (build.py) holds a variant of every kernel per instruction set; which one runs is
decided by what the CPU offers, at start-up: `select_isa("auto")` takes the first of ISA_ORDER
whose features the CPU reports, unless TIDEMIND_CPU_ISA names one (to compare variants, or to
step around a faulty one). The runner calls it and logs the choice; `tidemind check_env` shows it.
"""
from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Dict, FrozenSet, Optional, Tuple

from .build import CPUKernelBuildError, build_library, isa_flags

logger = logging.getLogger("tidemind")

# bit i of tm_cpu_features() (csrc/common.c)
FEATURE_BITS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512bf16", "avxvnni",
                "amx_tile", "amx_int8", "amx_bf16")
# preference order, and what each variant needs from the CPU
ISA_ORDER = ("avx512_vnni", "avx2", "scalar")
ISA_REQUIREMENTS: Dict[str, Tuple[str, ...]] = {
    "avx512_vnni": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512vnni"),
    "avx2": ("avx2", "fma", "f16c"),
    "scalar": (),
}
ISA_DESCRIPTIONS = {
    "avx512_vnni": "AVX-512 VNNI int8 dot products, 16 weight rows per register",
    "avx2": "AVX2 int8 multiply-adds (VPMADDUBSW), 8 weight rows per register",
    "scalar": "portable C (no SIMD kernels for this CPU)",
}
ISA_ENV = "TIDEMIND_CPU_ISA"

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_selected = None  # CPUKernels of the chosen ISA


def load_library() -> ctypes.CDLL:
    """The kernel library, built first if needed (CPUKernelBuildError names the fix if it cannot be)."""
    global _library
    with _lock:
        if _library is None:
            import torch  # noqa: F401  (its libgomp must be loaded first: the library shares it)
            _library = ctypes.CDLL(build_library())
            _library.tm_cpu_features.restype = ctypes.c_int64
        return _library


def cpu_features() -> FrozenSet[str]:
    bits = load_library().tm_cpu_features()
    return frozenset(name for i, name in enumerate(FEATURE_BITS) if bits & (1 << i))


def supported_isas() -> Tuple[str, ...]:
    """The variants this CPU can run, best first."""
    features = cpu_features()
    built = isa_flags()
    return tuple(isa for isa in ISA_ORDER if isa in built and all(f in features for f in ISA_REQUIREMENTS[isa]))


def select_isa(name: str = "auto"):
    """Choose the kernels' instruction set for this process ("auto": $TIDEMIND_CPU_ISA, else the
    best the CPU supports) and return its CPUKernels."""
    global _selected
    from .ops import CPUKernels

    requested = (os.environ.get(ISA_ENV) or "auto") if name == "auto" else name
    supported = supported_isas()
    if requested == "auto":
        isa = supported[0]
    elif requested not in ISA_ORDER:
        raise ValueError(f"CPU kernel ISA {requested!r} is not one of {', '.join(ISA_ORDER)} (check ${ISA_ENV})")
    elif requested not in supported:
        raise ValueError(f"CPU kernel ISA {requested!r} needs {', '.join(ISA_REQUIREMENTS[requested])}, which this "
                         f"CPU does not report; it runs: {', '.join(supported)}")
    else:
        isa = requested
    if _selected is None or _selected.isa != isa:
        _selected = CPUKernels(load_library(), isa)
    return _selected


def kernels():
    """The chosen CPUKernels (choosing "auto" when nothing was chosen yet)."""
    return _selected if _selected is not None else select_isa("auto")


def kernels_for(isa: str):
    """The CPUKernels of one ISA without changing the process's choice (tests compare variants)."""
    from .ops import CPUKernels
    return CPUKernels(load_library(), isa)


def describe(isa: str) -> str:
    features = cpu_features()
    shown = [f for f in FEATURE_BITS if f in features and f not in ("fma", "f16c")]
    return f"{isa} ({ISA_DESCRIPTIONS[isa]}; the CPU reports {', '.join(shown) or 'none of the SIMD extensions'})"


__all__ = ["CPUKernelBuildError", "ISA_ORDER", "cpu_features", "describe", "kernels", "kernels_for", "load_library",
           "select_isa", "supported_isas"]
