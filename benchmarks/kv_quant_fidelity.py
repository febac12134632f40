"""KV cache quantization's fidelity (QUANTIZATION.md): one model's perplexity with its KV cache
unquantized (the baseline), int8 and int4, and for each quantized cache the KL divergence from the
baseline's next-token distributions and the top-1 agreement, in one pass over the windows.

    python benchmarks/kv_quant_fidelity.py smollm2-135m --out kv_smollm2.json       # P1
    python benchmarks/kv_quant_fidelity.py gemma3-270m --max-tokens 16384            # P1's first 16 windows

P1 (benchmarks/WORKLOADS.md): WikiText-2 raw test, first 65,536 tokens in 1,024-token windows,
scored as `tidemind eval ppl` scores them (tidemind/eval/ppl.py: the same conventions, the model on
the engine's runner, each window prefilled whole, so with a quantized cache every query reads the
keys and values as stored, the window's own included). The same figures one policy at a time:

    tidemind eval ppl MODEL --quant-policy 8 --reference MODEL
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tidemind.config import EngineConfig  # noqa: E402
from tidemind.eval.ppl import ModelSpec, PPLSettings, evaluate, text_windows  # noqa: E402
from tidemind.loader.resolve import resolve_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a bundled name (smollm2-135m, gemma3-270m), a .gguf file or a directory")
    parser.add_argument("--dataset", default="wikitext2")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default=None, help="also write the figures to this JSON file")
    args = parser.parse_args()
    path = resolve_model(args.model).path
    windows = text_windows(path, PPLSettings(args.dataset, args.seq_len, args.max_tokens))

    def spec(quant_policy: int, name: str) -> ModelSpec:
        return ModelSpec(path, EngineConfig(device=args.device, dtype=args.dtype, quant_policy=quant_policy), name)

    results = evaluate([spec(8, "KV int8"), spec(4, "KV int4")], windows, reference=spec(0, "KV unquantized"))
    rows = {"model": args.model, "windows": windows.shape[0], "seq_len": args.seq_len,
            "cmd": "python benchmarks/kv_quant_fidelity.py " + " ".join(sys.argv[1:])}
    for result in results:
        change = 100 * (result.perplexity / result.reference_perplexity - 1)
        print("\n".join(result.lines()) + f"\n  perplexity change {change:+.3f}%", flush=True)
        rows[result.model] = {**vars(result), "ppl_change_pct": change,
                              "ln_ppl_ratio": math.log(result.perplexity / result.reference_perplexity)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
