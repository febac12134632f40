"""`tidemind eval ppl`: perplexity, KL divergence and top-1 agreement, to judge quantization."""
from __future__ import annotations

from .lazy import add_lazy_group

EVAL_COMMANDS = {
    "ppl": ("tidemind.cli.eval_ppl", "perplexity on windows of a text (P1), and KL divergence / top-1 agreement "
                                     "against a reference model"),
}


def add_commands(commands) -> None:
    add_lazy_group(commands, "eval", "evaluate a model (and a quantized copy against it)", EVAL_COMMANDS)
