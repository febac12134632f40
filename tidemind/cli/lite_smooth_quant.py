"""`tidemind lite smooth_quant MODEL`: SmoothQuant W8A8 (int8 weights per channel, int8 activations
per token), saved as LMDeploy writes it (quant_method smooth_quant)."""
from __future__ import annotations

import argparse
import functools

from .lite_common import (add_calibration_arguments, add_eval_arguments, add_model_arguments, calibration_settings,
                          report, resolve)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, "where the quantized model is written")
    add_calibration_arguments(parser)
    group = parser.add_argument_group("quantization")
    group.add_argument("--alpha", type=float, default=0.5,
                       help="migration strength: 0 leaves activations as they are, 1 moves all of their range "
                            "into the weights (default: 0.5)")
    group.add_argument("--w-bits", type=int, default=8, help="weight bits; W8A8 is 8-bit (default: 8)")
    add_eval_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from ..layers.quantization.w8a8 import SmoothQuantConfig
    from ..lite.pipeline import LiteJob, run_lite
    from ..lite.smooth_quant import smooth_layer, w8a8_quantizer

    if args.w_bits != 8:
        raise ValueError(f"--w-bits {args.w_bits}: SmoothQuant here quantizes weights to 8 bits; for 4-bit weights "
                         f"use `tidemind lite auto_awq`")
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha {args.alpha} must lie in [0, 1]")
    calib = calibration_settings(args)
    model_path, device = resolve(args)
    job = LiteJob(name="smooth_quant", quantization=SmoothQuantConfig(), quantizer=w8a8_quantizer,
                  process=functools.partial(smooth_layer, alpha=args.alpha))
    result = run_lite(model_path, args.work_dir, job, calib, device)
    report(args, model_path, result, quantized=True)
    return 0
