"""The Triton kernels compile for an H200 (sm_90), checked on this CPU machine.

The interpreter (every other kernel test here) runs a kernel's Python, not the GPU compiler: a global
read without tl.constexpr, a tl.dot shape or a layout the compiler refuses passes there and fails on
the GPU. `benchmarks/compile_sm90.py --quick` compiles each kernel's launches at one model shape,
default tiles, with Triton's own ptxas, and exits non-zero if one fails.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")


@pytest.mark.skipif(not os.path.exists(PTXAS), reason="this Triton build has no ptxas")
def test_every_kernel_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "compile_sm90.py"), "--quick"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0 and "all compiled" in done.stdout, done.stdout[-4000:] + done.stderr[-4000:]
