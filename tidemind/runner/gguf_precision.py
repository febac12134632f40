"""At which precision a GGUF model runs, decided once at start-up and logged.

On the CPU a GGUF runs at its stored precision by default, as llama.cpp does: its 4- and 8-bit
integers stay as they are and the CPU kernels (kernels/cpu) multiply them, with the instruction
set chosen from what the CPU offers. It runs dequantized to float32 (today's path, exact against
transformers) when:
    --dtype is given (float32, or a half type)    the user asked for that precision
    model_format is hf                            a dense model was asked for (LMDeploy's configs)
    the device is a GPU                           the GPU path dequantizes (W4A16 takes AWQ checkpoints)
    a 2-D weight is of a type not decoded here    gguf.stored_precision_blocker names it
    the kernels cannot be built (no C compiler)   one warning names the fix
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from ..loader.gguf import open_gguf, stored_precision_blocker
from ..loader.resolve import gguf_cache_dir, gguf_file_of
from .device import resolve_device

logger = logging.getLogger("tidemind")


def keep_gguf_quantized(model, dtype: str, device: str, model_format: Optional[str] = None) -> bool:
    """True when `model` (None, a bundled name or a path) is a GGUF that runs at stored precision."""
    gguf_path = gguf_file_of(model)
    if gguf_path is None:
        return False
    if model_format == "hf":  # a dense model was asked for (LMDeploy's engine configs often say so)
        logger.info("GGUF weights dequantized (model_format hf asks for a dense model; leave it out to run them "
                    "at their stored precision)")
        return False
    if dtype != "auto":
        logger.info("GGUF weights dequantized to %s (--dtype %s; leave it out on the CPU to run them at their "
                    "stored precision)", dtype, dtype)
        return False
    if resolve_device(device).type != "cpu":
        return False
    if not os.path.isdir(gguf_cache_dir(gguf_path, keep_quantized=True)):  # not converted before
        blocker = stored_precision_blocker(open_gguf(gguf_path))
        if blocker is not None:
            logger.info("GGUF weights dequantized to float32: %s, a type the CPU kernels do not take", blocker)
            return False
    from ..kernels.cpu.library import CPUKernelBuildError, describe, select_isa
    try:
        isa = select_isa("auto").isa
    except CPUKernelBuildError as exc:
        logger.warning("GGUF weights dequantized to float32, the slower path: %s", str(exc).splitlines()[0])
        return False
    logger.info("CPU kernels: %s", describe(isa))
    logger.info("GGUF weights at their stored precision (int4 / int8 CPU kernels); --dtype float32 runs them "
                "dequantized")
    return True
