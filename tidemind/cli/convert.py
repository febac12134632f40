"""`tidemind convert MODEL --dst-path DIR`: write a model in tidemind's pre-fused format (q/k/v and
gate/up merged, tidemind's parameter names and config), which loads without any name mapping."""
from __future__ import annotations

import argparse
import sys

from ..config import DTYPES, MODEL_FORMATS


def add_commands(commands) -> None:
    p = commands.add_parser(
        "convert", help="write a model in tidemind's pre-fused format (loads faster)",
        description="Write MODEL as a pre-fused safetensors directory: q/k/v and gate/up merged, tidemind's "
                    "parameter names, the format recorded in config.json. Pass DIR as MODEL to any verb.")
    p.add_argument("model", nargs="+", metavar="MODEL",
                   help="a model directory, a .gguf file or a bundled model name (LMDeploy 0.3's form "
                        "`convert MODEL_NAME MODEL_PATH` is accepted: the name is not needed)")
    p.add_argument("--dst-path", default="./workspace", help="the directory to write (default: ./workspace, "
                                                              "as LMDeploy); it must not exist or be empty")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="dtype of the stored tensors (default auto: the checkpoint's own; float32 loads "
                        "without any conversion on the CPU)")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel size the directory is meant for: checked (the model must split over it); "
                        "the format stores whole tensors and each rank takes its slice at load, so it serves "
                        "every --tp")
    p.add_argument("--model-format", default=None, choices=MODEL_FORMATS,
                   help="what MODEL must be (this build converts dense hf checkpoints)")
    p.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    p.set_defaults(handler=run_convert, verb_parser=p)


def run_convert(args: argparse.Namespace) -> int:
    from ..config import EngineConfig
    from ..convert import convert

    if len(args.model) > 2:
        raise ValueError(f"convert takes one MODEL (or LMDeploy's MODEL_NAME MODEL_PATH), got {args.model}")
    EngineConfig(tp=args.tp, model_format=args.model_format)  # refuses what tidemind cannot do, naming it
    result = convert(args.model[-1], args.dst_path, args.dtype, tp=args.tp)
    print(f"wrote {result.dst_path}: {result.num_tensors} tensors, {result.num_bytes / 2**20:.1f} MiB "
          f"{result.dtype}, in {result.seconds:.1f} s", file=sys.stderr)
    return 0
