"""`tidemind lite calibrate | auto_awq | smooth_quant`: compress a model (LMDeploy's lite verbs and
flags). Each verb's module is imported only when it runs."""
from __future__ import annotations

from .lazy import add_lazy_group

LITE_COMMANDS = {
    "calibrate": ("tidemind.cli.lite_calibrate",
                  "run calibration text through the model layer by layer and save per-layer input statistics"),
    "auto_awq": ("tidemind.cli.lite_auto_awq",
                 "W4A16 AWQ: activation-aware group-wise int4 weights, saved in AutoAWQ's GEMM layout"),
    "smooth_quant": ("tidemind.cli.lite_smooth_quant",
                     "W8A8 SmoothQuant: int8 weights per channel, int8 activations per token at run time"),
}


def add_commands(commands) -> None:
    add_lazy_group(commands, "lite", "compress a model: calibration, AWQ W4A16, SmoothQuant W8A8", LITE_COMMANDS)
