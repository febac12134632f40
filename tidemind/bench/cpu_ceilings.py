"""The CPU's measured ceilings, the roofline every CPU figure is a share of.

    copy_GBps           bytes read + written per second copying a 256 MiB float32 buffer
                        (numpy, median of 5): streaming weights is bound by this
    matmul_fp32_GFLOPs  a float32 2048^3 matmul (numpy, best of 3): batched compute is bound by this

Rooflines of a dense float32 decoder (weights streamed once per step, 2 FLOPs per weight per token):
    batch-1 decode tokens/s  <=  copy bandwidth / bytes of the weights a step reads
    batched tokens/s         <=  matmul rate / (2 * weights a token multiplies)
"""
from __future__ import annotations

import math
import os
import platform
import time


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        name = ""
    return name or platform.processor() or platform.machine()


def measure_cpu_ceilings() -> dict:
    import numpy as np

    src = np.ones(64 * 2**20, dtype=np.float32)
    dst = np.empty_like(src)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    matmul_s = math.inf
    for _ in range(3):
        start = time.perf_counter()
        a @ a
        matmul_s = min(matmul_s, time.perf_counter() - start)
    return {"cpu": cpu_name(), "cores": os.cpu_count(),
            "copy_GBps": round(2 * src.nbytes / sorted(times)[2] / 1e9, 2),
            "matmul_fp32_GFLOPs": round(2 * 2048**3 / matmul_s / 1e9, 1)}


def step_weight_count(model) -> int:
    """Weights one decode step multiplies per token: every Linear (by its logical shape, whatever
    its storage) and the LM head; not the input embedding, whose lookup reads only the batch's rows."""
    from ..layers.embedding import LMHead
    from ..layers.linear import Linear

    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            count += module.input_size * module.output_size
        elif isinstance(module, LMHead):
            count += module.vocab_size * module.hidden_size
    return count


def step_weight_bytes(model) -> int:
    """Bytes of weights one decode step streams, as stored (dense, repacked or quantized): every
    Linear's parameters and packed copies, the LM head's weight, the norms; not the input embedding
    (a lookup reads only the batch's rows) unless the LM head shares it."""
    from ..layers.embedding import LMHead, VocabEmbedding

    def stored(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def method_bytes(module) -> int:
        # methods that keep their weight outside the module's parameters (GGUF's packed tiles) say so
        return getattr(module.__dict__.get("linear_method"), "nbytes", 0)

    total = 0
    for module in model.modules():
        if isinstance(module, VocabEmbedding):
            continue
        own = list(module.parameters(recurse=False)) + [getattr(module, "packed_weight", None)]
        if isinstance(module, LMHead):
            if module.packed_weight is None and method_bytes(module.table_owner):
                total += method_bytes(module.table_owner)
                continue
            own = [module.packed_weight if module.packed_weight is not None else module.effective_weight]
        total += stored(own) + method_bytes(module)
    return total
