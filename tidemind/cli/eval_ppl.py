"""`tidemind eval ppl MODEL`: perplexity over windows of a text (P1 by default), and with
--reference the KL divergence and top-1 agreement against another model (its unquantized self)."""
from __future__ import annotations

import argparse
import json

from ..config import DEVICES, DTYPES, MODEL_FORMATS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a model directory, a .gguf file or a bundled model name")
    parser.add_argument("--reference", metavar="MODEL", default=None,
                        help="the model to compare against (e.g. the unquantized one): adds KL divergence and "
                             "top-1 agreement")
    parser.add_argument("--dataset", default="wikitext2",
                        help="a UTF-8 text file, or wikitext2 / war-and-peace (default: wikitext2)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per window (default: 1024)")
    parser.add_argument("--max-tokens", type=int, default=65536, help="tokens of text scored (default: 65536)")
    parser.add_argument("--quant-policy", type=int, default=0, choices=(0, 4, 8),
                        help="KV cache quantization: 0 (none), 8 (int8) or 4 (int4) (default: 0)")
    parser.add_argument("--model-format", default=None, choices=MODEL_FORMATS,
                        help="what MODEL must be (default: whatever its config.json records)")
    parser.add_argument("--device", default="auto", choices=DEVICES, help="(default: auto)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="(default: auto: float32 on the CPU, the checkpoint's half dtype on a GPU)")
    parser.add_argument("--output", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--log-level", default="WARNING", help="logging level (default: WARNING)")


def run(args: argparse.Namespace) -> int:
    from ..config import EngineConfig
    from ..eval.ppl import ModelSpec, PPLSettings, check_quant_policy, evaluate, text_windows
    from ..lite.data import check_dataset
    from ..loader.resolve import resolve_model

    if args.seq_len < 2 or args.max_tokens < args.seq_len:
        raise ValueError(f"--seq-len must be >= 2 and --max-tokens >= --seq-len (got {args.seq_len}, "
                         f"{args.max_tokens})")
    check_dataset(args.dataset)
    extra = check_quant_policy(args.quant_policy)
    model = resolve_model(args.model).path
    reference = resolve_model(args.reference).path if args.reference else None
    config = EngineConfig(device=args.device, dtype=args.dtype, model_format=args.model_format, **extra)
    windows = text_windows(model, PPLSettings(args.dataset, args.seq_len, args.max_tokens))
    reference_spec = (ModelSpec(reference, EngineConfig(device=args.device, dtype=args.dtype), args.reference)
                      if reference else None)
    result, = evaluate([ModelSpec(model, config, args.model)], windows, reference_spec)
    print("\n".join(result.lines()))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(vars(result), f, indent=2)
    return 0
