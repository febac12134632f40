"""`tidemind lite auto_awq MODEL`: W4A16 AWQ, saved in AutoAWQ's GEMM layout (runs with
--model-format awq, or detected from its config.json)."""
from __future__ import annotations

import argparse
import functools

from .lite_common import (add_calibration_arguments, add_eval_arguments, add_model_arguments, calibration_settings,
                          report, resolve)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, "where the quantized model is written")
    add_calibration_arguments(parser)
    group = parser.add_argument_group("quantization")
    group.add_argument("--w-bits", type=int, default=4, help="weight bits; AWQ here is 4-bit (default: 4)")
    group.add_argument("--w-group-size", type=int, default=128,
                       help="input features sharing a scale and zero point; must divide every layer's width "
                            "(default: 128)")
    group.add_argument("--w-sym", action="store_true", help="symmetric int4 (zero point 8) instead of asymmetric")
    group.add_argument("--search-scale", action="store_true",
                       help="search each group's scale exponent over a grid and clip weights (slower, better); "
                            "otherwise the exponent is 0.5")
    group.add_argument("--rtn", action="store_true",
                       help="plain round-to-nearest: no calibration, no scaling (the baseline AWQ improves on)")
    add_eval_arguments(parser)


def _check_widths(model_path: str, settings) -> None:
    """Build the quantized model on the meta device: a group size that does not divide a layer's
    width fails here, naming the layer, before any long work."""
    import torch

    from ..layers.context import BuildContext
    from ..loader.checkpoint import model_class_for, read_hf_config

    hf_config = read_hf_config(model_path)
    with torch.device("meta"):
        model_class_for(hf_config, model_path)(hf_config, BuildContext(quantization=settings.config()))


def run(args: argparse.Namespace) -> int:
    from ..lite.awq import AWQSettings, awq_layer, awq_quantizer
    from ..lite.pipeline import LiteJob, run_lite

    if args.w_bits != 4:
        raise ValueError(f"--w-bits {args.w_bits}: tidemind's AWQ quantizes to 4 bits; for 8-bit weights use "
                         f"`tidemind lite smooth_quant`")
    if args.w_group_size < 1:
        raise ValueError(f"--w-group-size must be >= 1, got {args.w_group_size}")
    calib = calibration_settings(args)
    model_path, device = resolve(args)
    settings = AWQSettings(group_size=args.w_group_size, sym=args.w_sym, search_scale=args.search_scale, rtn=args.rtn)
    _check_widths(model_path, settings)
    job = LiteJob(name="auto_awq" + (" (rtn)" if args.rtn else ""), quantization=settings.config(),
                  quantizer=awq_quantizer(settings), needs_calibration=not args.rtn, keep_rows=True,
                  process=None if args.rtn else functools.partial(awq_layer, settings=settings))
    result = run_lite(model_path, args.work_dir, job, calib, device)
    report(args, model_path, result, quantized=True)
    return 0
