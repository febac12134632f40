"""`tidemind bench latency`: one request at a time (D1: decode speed; L1: time to first token of a
long prompt), or any --input-len / --output-len; a table, JSON and a PNG of the inter-token latency
along the answer.

    tidemind bench latency MODEL --workload D1        # 128-token prompt, 512 new tokens
    tidemind bench latency MODEL --workload L1        # 8000-token prompt, 64 new tokens
"""
from __future__ import annotations

import argparse
import statistics

from ..config import GenerationConfig
from .offline import run_requests
from .offline_cli import add_engine_arguments, environment, print_table, start_pipeline
from .serve_report import output_paths, write_json
from .workloads import random_prompt

LATENCY_WORKLOADS = {"D1": (128, 512), "L1": (8000, 64)}  # (prompt tokens, new tokens)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workload", choices=sorted(LATENCY_WORKLOADS), default="D1")
    parser.add_argument("--input-len", type=int, help="prompt tokens (random ids, seed 0); default: the workload's")
    parser.add_argument("--output-len", type=int, help="new tokens (EOS ignored); default: the workload's")
    parser.add_argument("--num-iters", type=int, default=3, help="timed runs (the median is reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    add_engine_arguments(parser, default_out="bench-latency")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    input_len, output_len = LATENCY_WORKLOADS[args.workload]
    input_len, output_len = args.input_len or input_len, args.output_len or output_len
    if args.num_iters < 1 or input_len < 1 or output_len < 2:
        raise ValueError("--num-iters and --input-len must be >= 1, --output-len >= 2")
    pipe, startup_s = start_pipeline(args)
    with pipe:
        prompt = random_prompt(pipe.engine.model_config.vocab_size, input_len)
        gen = GenerationConfig(max_new_tokens=output_len, ignore_eos=True)
        for _ in tqdm(range(args.warmup), desc="warm-up", leave=False):
            run_requests(pipe.async_engine, [prompt], gen.replace(max_new_tokens=min(output_len, 32)))
        runs = []
        for _ in tqdm(range(args.num_iters), desc=f"{args.workload} runs", leave=False):
            stats = run_requests(pipe.async_engine, [prompt], gen, keep_token_times=True)
            times = stats.token_times_s[0]
            runs.append({"ttft_s": stats.ttft_s[0], "decode_tok_s": (len(times) - 1) / (times[-1] - times[0]),
                         "total_s": stats.wall_s, "itl_ms": [1e3 * (b - a) for a, b in zip(times, times[1:])]})
        env = environment(pipe, args, startup_s)
    summary = {key: statistics.median(r[key] for r in runs) for key in ("ttft_s", "decode_tok_s", "total_s")}
    roofline = env.get("roofline", {}).get("roofline_tok_s")
    if roofline:
        summary["decode_share_of_roofline"] = summary["decode_tok_s"] / roofline
    result = {"workload": args.workload, "input_len": input_len, "output_len": output_len, "environment": env,
              "summary": summary, "runs": runs}
    json_path, png_path = output_paths(args.out)
    write_json(result, json_path)
    _plot(result, png_path)
    print_table(f"{args.workload}: {input_len}-token prompt, {output_len} new tokens, batch 1 "
                f"({env['engine']}; start-up {startup_s:.1f} s)",
                [{"run": i + 1, "TTFT ms": 1e3 * r["ttft_s"], "decode tok/s": r["decode_tok_s"],
                  "total s": r["total_s"]} for i, r in enumerate(runs)]
                + [{"run": "median", "TTFT ms": 1e3 * summary["ttft_s"], "decode tok/s": summary["decode_tok_s"],
                    "total s": summary["total_s"]}])
    if roofline:
        print(f"roofline {roofline:.1f} tok/s ({env['roofline']['copy_GBps']} GB/s copy): decode at "
              f"{summary['decode_share_of_roofline']:.1%}")
    print(f"results: {json_path}, {png_path}")
    return 0


def _plot(result: dict, path) -> None:
    from .serve_report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, r in enumerate(result["runs"]):
        ax.plot(range(2, len(r["itl_ms"]) + 2), r["itl_ms"], lw=0.8, label=f"run {i + 1}")
    ax.set_xlabel("output token")
    ax.set_ylabel("inter-token latency (ms)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    s = result["summary"]
    ax.set_title(f"{result['workload']}: {result['environment']['model']}, {s['decode_tok_s']:.1f} tok/s decode, "
                 f"TTFT {1e3 * s['ttft_s']:.0f} ms", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
