"""The fidelity table of QUANTIZATION.md for one bundled model, on the CPU:

    python benchmarks/quant_fidelity.py smollm2-135m --w-group-size 64 --out-dir /tmp/fidelity
    python benchmarks/quant_fidelity.py gemma3-270m --w-group-size 128 --out-dir /tmp/fidelity

1. quantizes the model (the GGUF dequantized to float32 is the unquantized baseline) three ways
   with the `tidemind lite` commands, timed: RTN int4 (auto_awq --rtn), AWQ int4 (auto_awq
   --search-scale) and SmoothQuant W8A8 (smooth_quant), calibrated on War and Peace;
2. scores the baseline and the three copies on the P1 windows (the first 65,536 tokens of
   WikiText-2 in windows of 1,024) in one pass: perplexity, and for each copy the KL divergence
   from the baseline and the top-1 agreement (tidemind eval ppl);
3. scores the same windows with Hugging Face transformers, which dequantizes the GGUF itself;
4. writes OUT_DIR/fidelity-MODEL.json and prints the table's rows.
--reuse keeps copies an earlier run made in OUT_DIR.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from tidemind.cli.main import main as tidemind  # noqa: E402
from tidemind.config import EngineConfig  # noqa: E402
from tidemind.eval.ppl import ModelSpec, PPLSettings, evaluate, text_windows  # noqa: E402
from tidemind.loader.bundled import find_bundled  # noqa: E402
from tidemind.loader.resolve import resolve_model  # noqa: E402


def quantize(model: str, out_dir: str, args) -> dict:
    """{name: (directory, command, seconds)} of the three copies."""
    calib = ["--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen), "--device", "cpu"]
    group = ["--w-group-size", str(args.w_group_size)]
    runs = {"RTN int4": ["auto_awq", "--rtn", *group, "--device", "cpu"],
            "AWQ int4": ["auto_awq", "--search-scale", *group, *calib],
            "W8A8": ["smooth_quant", "--alpha", str(args.alpha), *calib]}
    made = {}
    for name, argv in runs.items():
        work = os.path.join(out_dir, f"{model}-{name.split()[0].lower()}")
        command = ["lite", argv[0], model, "--work-dir", work, *argv[1:]]
        seconds = None
        if not (args.reuse and os.path.isfile(os.path.join(work, "config.json"))):
            start = time.perf_counter()
            if tidemind(command) != 0:
                raise SystemExit(f"tidemind {' '.join(command)} failed")
            seconds = time.perf_counter() - start
        made[name] = (work, "tidemind " + " ".join(command), seconds)
    return made


@torch.inference_mode()
def transformers_perplexity(model: str, windows: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    gguf = find_bundled(model).locate()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf), gguf_file=os.path.basename(gguf),
                                              dtype=torch.float32).eval()
    nll = []
    for window in tqdm(windows, desc="transformers windows", unit="window"):
        logits = hf(input_ids=window[None], use_cache=False).logits[0, :-1].float()
        nll.append(torch.nn.functional.cross_entropy(logits, window[1:], reduction="none").double())
    return math.exp(torch.cat(nll).mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=("smollm2-135m", "gemma3-270m"))
    parser.add_argument("--out-dir", default="/tmp/fidelity")
    parser.add_argument("--w-group-size", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--calib-seqlen", type=int, default=512)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--max-tokens", type=int, default=65536)
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.makedirs(args.out_dir, exist_ok=True)
    made = quantize(args.model, args.out_dir, args)
    baseline = resolve_model(args.model).path
    windows = text_windows(baseline, PPLSettings(max_tokens=args.max_tokens))
    config = EngineConfig(device="cpu", dtype="float32")
    start = time.perf_counter()
    results = evaluate([ModelSpec(work, config, name) for name, (work, _, _) in made.items()], windows,
                       ModelSpec(baseline, config, "baseline"))
    eval_seconds = time.perf_counter() - start
    hf_ppl = None if args.skip_transformers else transformers_perplexity(args.model, windows)
    rows = [{"name": "baseline (GGUF dequantized, float32)", "perplexity": results[0].reference_perplexity,
             "transformers_perplexity": hf_ppl}]
    for (name, (work, command, seconds)), result in zip(made.items(), results):
        rows.append({"name": name, "perplexity": result.perplexity, "kl_mean": result.kl_mean,
                     "kl_p99": result.kl_p99, "top1_agreement": result.top1_agreement,
                     "ppl_change": result.perplexity / result.reference_perplexity - 1,
                     "command": command, "quantize_seconds": seconds, "directory": work})
    summary = {"model": args.model, "windows": int(windows.shape[0]), "predicted_tokens": results[0].predicted_tokens,
               "eval_seconds": round(eval_seconds, 1), "args": vars(args), "rows": rows,
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    with open(os.path.join(args.out_dir, f"fidelity-{args.model}.json"), "w") as f:
        json.dump(summary, f, indent=2)
    for row in rows:
        extra = (f" | {row['ppl_change']:+.2%} | {row['kl_mean']:.4f} | {100 * row['top1_agreement']:.1f}%"
                 if "kl_mean" in row else f" | transformers {row['transformers_perplexity']}")
        print(f"| {row['name']} | {row['perplexity']:.3f}{extra} |")


if __name__ == "__main__":
    main()
