"""Which CPU kernels each system of a CPU benchmark ran (tidemind, torch, llama.cpp), recorded with
its figures: the same machine runs different code by its instruction set or by a restriction asked
for (BENCHMARKS.md: the AVX2 kind emulated on an AVX-512 machine)."""
from __future__ import annotations

import os


def kernel_choices(bench_cache: str) -> dict:
    """Which CPU kernels each system runs: tidemind's ISA (kernels/cpu/library.py: the best this CPU
    offers, or $TIDEMIND_CPU_ISA), torch's (its float32 path and transformers'; $ATEN_CPU_CAPABILITY
    lowers it) and the flags llama.cpp was built with (build_llama_server.sh writes them next to its
    binaries in bench_cache)."""
    import torch

    from ..kernels.cpu.library import select_isa

    try:
        with open(os.path.join(bench_cache, "llama-build-flags.txt")) as f:
            llama_build = f.read().strip()
    except OSError:
        llama_build = "unknown (built before build_llama_server.sh recorded its flags)"
    return {"tidemind_cpu_isa": select_isa().isa, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "llama_cpp_build": llama_build}
