"""Build the CPU kernels (csrc/) into one shared library with the machine's C compiler, once per
source version, and cache it.

The library holds every instruction-set variant (qlinear.c, layer_ops.c, attention.c and
decoder_layer.c compiled once per ISA, their symbols suffixed _avx512_vnni / _avx2 / _scalar) plus
common.c and pool.c; library.py picks the variant at start-up from what the CPU reports. Nothing
beyond a C compiler with OpenMP (gcc) is needed, and no Python or torch headers: Python calls the
library through ctypes. OpenMP calls resolve to the libgomp torch has already loaded (same soname), so the
kernels share torch's thread pool.

Where: $TIDEMIND_KERNEL_CACHE_DIR, else <tidemind cache>/kernels, in a directory named after a hash
of the sources, the flags and the compiler's version; built in a temporary sibling and renamed
into place, so concurrent first runs are safe and a directory that exists is complete.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from typing import Dict, List

logger = logging.getLogger("tidemind")

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
LIBRARY_NAME = "libtidemind_cpu.so"
PER_ISA_SOURCES = ("qlinear.c", "layer_ops.c", "attention.c", "decoder_layer.c")
COMMON_SOURCES = ("common.c", "pool.c")
HEADERS = ("tm_cpu.h", "tm_math.h")
CFLAGS = ["-O3", "-std=gnu11", "-fPIC", "-fopenmp", "-pthread", "-ffp-contract=off", "-fno-math-errno",
          "-fno-trapping-math", "-Wall", "-Wextra", "-Wno-unused-parameter"]
_X86_ISA_FLAGS: Dict[str, List[str]] = {
    "avx512_vnni": ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                    "-mavx512vnni"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "scalar": [],
}


class CPUKernelBuildError(RuntimeError):
    """The CPU kernels could not be built here (no C compiler, or it failed)."""


def is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "i386")


def isa_flags() -> Dict[str, List[str]]:
    """The instruction-set variants built on this machine's architecture, with their flags."""
    return dict(_X86_ISA_FLAGS) if is_x86() else {"scalar": []}


def kernel_cache_dir() -> str:
    explicit = os.environ.get("TIDEMIND_KERNEL_CACHE_DIR")
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    from ...loader.resolve import cache_root
    return os.path.join(cache_root(), "kernels")


def compiler() -> str:
    for candidate in (os.environ.get("CC"), "gcc", "cc"):
        if candidate and shutil.which(candidate):
            return candidate
    raise CPUKernelBuildError("no C compiler found (tried $CC, gcc, cc): install gcc (e.g. apt-get install gcc) to "
                              "run quantized GGUF weights on the CPU, or pass --dtype float32 to run them "
                              "dequantized")


def _compiler_version(cc: str) -> str:
    proc = subprocess.run([cc, "--version"], capture_output=True, text=True)
    return proc.stdout.splitlines()[0] if proc.stdout else cc


def _source_key(cc: str) -> str:
    digest = hashlib.sha256()
    for name in PER_ISA_SOURCES + COMMON_SOURCES + HEADERS:
        with open(os.path.join(CSRC, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read())
    digest.update(repr((CFLAGS, isa_flags(), _compiler_version(cc), platform.machine())).encode())
    return digest.hexdigest()[:16]


def _compile_commands(cc: str, out_dir: str) -> List[List[str]]:
    commands = []
    for isa, flags in isa_flags().items():
        for source in PER_ISA_SOURCES:
            obj = os.path.join(out_dir, f"{source[:-2]}_{isa}.o")
            commands.append([cc, *CFLAGS, *flags, f"-DTM_ISA={isa}", "-c", os.path.join(CSRC, source), "-o", obj])
    for source in COMMON_SOURCES:
        commands.append([cc, *CFLAGS, "-c", os.path.join(CSRC, source), "-o", os.path.join(out_dir, source[:-2] + ".o")])
    return commands


def _run_all(commands: List[List[str]], jobs: int) -> None:
    """Run the compile commands, `jobs` at a time; raise with the compiler's message on a failure."""
    pending, running = list(commands), []
    while pending or running:
        while pending and len(running) < jobs:
            command = pending.pop(0)
            running.append((command, subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True)))
        command, proc = running.pop(0)
        output, _ = proc.communicate()
        if proc.returncode != 0:
            for _, other in running:
                other.kill()
            raise CPUKernelBuildError(f"compiling the CPU kernels failed:\n{' '.join(command)}\n{output[-4000:]}")
        if output.strip():
            logger.debug("compiler output for %s:\n%s", command[-3], output)


def build_library(cache_dir: str = None) -> str:
    """The path of the built library, building it first when this source version has none yet."""
    cc = compiler()
    cache_dir = cache_dir or kernel_cache_dir()
    target = os.path.join(cache_dir, f"cpu-{_source_key(cc)}")
    library = os.path.join(target, LIBRARY_NAME)
    if os.path.isfile(library):
        return library
    os.makedirs(cache_dir, exist_ok=True)
    start = time.perf_counter()
    logger.info("building the CPU kernels with %s into %s (once per version; about half a minute)", cc, target)
    tmp = tempfile.mkdtemp(prefix=".tmp-cpu-", dir=cache_dir)
    try:
        _run_all(_compile_commands(cc, tmp), jobs=max(1, os.cpu_count() or 1))
        objects = sorted(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(".o"))
        _run_all([[cc, "-shared", "-fopenmp", "-pthread", *objects, "-o", os.path.join(tmp, LIBRARY_NAME)]], jobs=1)
        try:
            os.rename(tmp, target)
        except OSError:
            if not os.path.isfile(library):
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("built the CPU kernels in %.1f s", time.perf_counter() - start)
    return library
