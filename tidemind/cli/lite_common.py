"""Flags and steps shared by the `tidemind lite` verbs: the model, the work directory, the
calibration text and the closing --eval, each checked before any long work starts."""
from __future__ import annotations

import argparse
import os
import sys

from ..config import DEVICES


def add_model_arguments(parser: argparse.ArgumentParser, work_dir_help: str) -> None:
    parser.add_argument("model", metavar="MODEL", help="a Hugging Face model directory, a .gguf file or a bundled "
                                                       "model name (see `tidemind list`)")
    parser.add_argument("--work-dir", default="./work_dir", help=work_dir_help + " (default: ./work_dir)")
    parser.add_argument("--device", default="auto", choices=DEVICES,
                        help="where calibration runs: auto (cuda when visible), cuda or cpu (default: auto)")
    parser.add_argument("--log-level", default="WARNING", help="logging level, e.g. INFO (default: WARNING)")


def add_calibration_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("calibration")
    group.add_argument("--calib-dataset", default="war-and-peace",
                       help="a UTF-8 text file, or war-and-peace / wikitext2 (shipped with tidemind; "
                            "$TIDEMIND_DATA_DIR may hold the full texts) (default: war-and-peace)")
    group.add_argument("--calib-samples", type=int, default=128, help="windows of text (default: 128)")
    group.add_argument("--calib-seqlen", type=int, default=2048, help="tokens per window (default: 2048)")
    group.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default: 1)")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("evaluation")
    group.add_argument("--eval", action="store_true",
                       help="end with `tidemind eval ppl` of the output against MODEL (P1: wikitext2)")
    group.add_argument("--eval-max-tokens", type=int, default=65536,
                       help="tokens of text --eval scores (default: 65536, the P1 workload)")


def calibration_settings(args: argparse.Namespace):
    from ..lite.data import check_dataset
    from ..lite.pipeline import CalibrationSettings

    for flag in ("calib_samples", "calib_seqlen", "batch_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    check_dataset(args.calib_dataset)
    return CalibrationSettings(dataset=args.calib_dataset, num_samples=args.calib_samples, seq_len=args.calib_seqlen,
                               batch_size=args.batch_size)


def resolve(args: argparse.Namespace):
    """(model directory, torch device) of the flags; the model must be one lite can quantize."""
    from ..lite.layerwise import check_quantizable
    from ..loader.resolve import resolve_model
    from ..runner.device import resolve_device

    path = resolve_model(args.model).path
    check_quantizable(path)
    if os.path.isfile(args.work_dir):
        raise ValueError(f"--work-dir {args.work_dir!r} is a file; pass a directory")
    return path, resolve_device(args.device)


def report(args: argparse.Namespace, model_path: str, result, quantized: bool) -> None:
    seconds = ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items())
    what = ([] if not quantized else ["quantized model"]) + ([] if not result.num_tokens else
                                                              [f"statistics of {result.num_tokens} tokens"])
    print(f"{' and '.join(what)} in {result.work_dir} ({seconds})", file=sys.stderr)
    if quantized and getattr(args, "eval", False):
        from ..config import EngineConfig
        from ..eval.ppl import ModelSpec, PPLSettings, evaluate, text_windows

        windows = text_windows(model_path, PPLSettings(max_tokens=args.eval_max_tokens))
        config = EngineConfig(device=args.device)
        outcome, = evaluate([ModelSpec(result.work_dir, config, result.work_dir)], windows,
                            ModelSpec(model_path, config, args.model))
        print("\n".join(outcome.lines()))
