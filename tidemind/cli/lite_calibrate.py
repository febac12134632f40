"""`tidemind lite calibrate MODEL`: per-layer input statistics of every linear layer
(work_dir/inputs_stats.pth), gathered layer by layer."""
from __future__ import annotations

import argparse

from .lite_common import add_calibration_arguments, add_model_arguments, calibration_settings, report, resolve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, "where inputs_stats.pth and calibration.json are written")
    add_calibration_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..lite.pipeline import LiteJob, run_lite

    calib = calibration_settings(args)
    model_path, device = resolve(args)
    result = run_lite(model_path, args.work_dir, LiteJob(name="calibrate"), calib, device)
    report(args, model_path, result, quantized=False)
    return 0
