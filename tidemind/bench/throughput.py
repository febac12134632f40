"""`tidemind bench throughput`: many requests submitted at once (T1 by default: 512 prompts of
128..1024 random token ids, 256 new tokens); a table, JSON and a PNG of output tokens over time and
the time-to-first-token distribution.

    tidemind bench throughput MODEL                       # T1
    tidemind bench throughput MODEL --num-prompts 64 --input-len 2000 --output-len 128
"""
from __future__ import annotations

import argparse

import numpy as np

from ..config import GenerationConfig
from .offline import run_requests
from .offline_cli import add_engine_arguments, environment, print_table, start_pipeline
from .serve_report import output_paths, write_json
from .workloads import t1_prompts


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-prompts", type=int, default=512)
    parser.add_argument("--input-len", type=int,
                        help="every prompt this many random token ids (default: T1's lengths, 128..1024)")
    parser.add_argument("--output-len", type=int, default=256, help="new tokens per request (EOS ignored)")
    parser.add_argument("--warmup", type=int, default=64, help="requests of 16 tokens run first, untimed")
    add_engine_arguments(parser, default_out="bench-throughput")


def _prompts(vocab: int, count: int, input_len) -> list:
    if input_len is None:
        if count > 512:
            raise ValueError("T1 has 512 prompts; give --input-len for more")
        return t1_prompts(vocab, count)
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, input_len).tolist() for _ in range(count)]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    if args.num_prompts < 1 or args.output_len < 1:
        raise ValueError("--num-prompts and --output-len must be >= 1")
    pipe, startup_s = start_pipeline(args)
    with pipe:
        vocab = pipe.engine.model_config.vocab_size
        prompts = _prompts(vocab, args.num_prompts, args.input_len)
        if args.warmup:
            run_requests(pipe.async_engine, prompts[:args.warmup], GenerationConfig(max_new_tokens=16, ignore_eos=True))
        with tqdm(total=len(prompts), desc="requests", unit="req", leave=False) as bar:
            stats = run_requests(pipe.async_engine, prompts, GenerationConfig(max_new_tokens=args.output_len,
                                                                             ignore_eos=True),
                                 on_finished=lambda: bar.update(1))
        preemptions = pipe.engine.scheduler.num_preemptions
        env = environment(pipe, args, startup_s)
    ttft = np.asarray(stats.ttft_s)
    summary = {**stats.summary(), "ttft_p99_s": round(float(np.percentile(ttft, 99)), 4),
               "requests_per_s": round(len(prompts) / stats.wall_s, 3), "preemptions": preemptions}
    result = {"workload": "T1" if args.input_len is None else "custom", "num_prompts": len(prompts),
              "input_len": args.input_len, "output_len": args.output_len, "environment": env, "summary": summary,
              "ttft_s": stats.ttft_s, "token_curve": stats.token_curve}
    json_path, png_path = output_paths(args.out)
    write_json(result, json_path)
    _plot(result, png_path)
    print_table(f"{result['workload']}: {len(prompts)} requests, {args.output_len} new tokens each "
                f"({env['engine']}; start-up {startup_s:.1f} s)",
                [{"output tok/s": summary["output_tok_s"], "total tok/s": summary["total_tok_s"],
                  "req/s": summary["requests_per_s"], "wall s": summary["wall_s"],
                  "TTFT p50 s": summary["ttft_p50_s"], "TTFT p99 s": summary["ttft_p99_s"],
                  "preemptions": preemptions}])
    print(f"results: {json_path}, {png_path}")
    return 0


def _plot(result: dict, path) -> None:
    from .serve_report import _cdf, _pyplot

    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    curve = result["token_curve"]
    left.plot([t for t, _ in curve], [n for _, n in curve])
    left.set_xlabel("seconds since the requests were submitted")
    left.set_ylabel("output tokens so far")
    left.grid(alpha=0.3)
    _cdf(right, [1e3 * t for t in result["ttft_s"]], "TTFT")
    right.set_xlabel("time to first token (ms)")
    right.set_ylabel("share of requests")
    right.grid(alpha=0.3)
    s = result["summary"]
    fig.suptitle(f"{result['workload']}: {result['environment']['model']}, {s['output_tok_s']:.0f} output tok/s, "
                 f"{s['wall_s']:.1f} s", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
