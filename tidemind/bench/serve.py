"""`tidemind bench serve`: load any OpenAI-compatible server with the S1 / C2 workloads
(benchmarks/WORKLOADS.md) and measure TTFT, TPOT, ITL and throughput from the client side.

Top-level imports stay light (the CLI imports this module to build its parser); httpx, numpy,
matplotlib and tqdm load inside `run`.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys

from .serve_settings import SERVE_WORKLOADS, ServeBenchSettings


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); pass an object, e.g. '{{\"min_tokens\": 128}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object, e.g. '{\"min_tokens\": 128}'")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True, help="root of the OpenAI-compatible server, e.g. http://127.0.0.1:23333")
    parser.add_argument("--workload", choices=sorted(SERVE_WORKLOADS), default="C2",
                        help="C2: chat prompts to /v1/chat/completions; S1: T1 token ids to /v1/completions "
                             "(benchmarks/WORKLOADS.md)")
    parser.add_argument("--request-rate", type=float, nargs="+", default=None, metavar="R",
                        help="requests per second (Poisson arrivals), one run per value; inf sends all at once "
                             "(default: C2 inf, S1 4 16 inf)")
    parser.add_argument("--concurrency", type=int, default=None, metavar="N",
                        help="most requests in flight at once; 0 = no limit (default: C2 16, S1 no limit)")
    parser.add_argument("--num-prompts", type=int, default=None, metavar="N", help="requests per run (default: C2 32, S1 512)")
    parser.add_argument("--max-tokens", type=int, default=None, metavar="N", help="new tokens per request (default: C2 128, S1 256)")
    parser.add_argument("--model", default=None, help="model name to send (default: the first one /v1/models lists)")
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                        help="ask the server to generate all --max-tokens (field 'ignore_eos')")
    parser.add_argument("--extra-body", type=_json_object, default={}, metavar="JSON",
                        help="fields merged into every request body, e.g. '{\"min_tokens\": 128}'")
    parser.add_argument("--vocab-size", type=int, default=49152, help="S1: random token ids are drawn below this (SmolLM2: 49152)")
    parser.add_argument("--seed", type=int, default=0, help="Poisson arrival seed (numpy)")
    parser.add_argument("--warmup", type=int, default=1, metavar="N", help="short requests sent (and not measured) before the runs")
    parser.add_argument("--timeout", type=float, default=600.0, metavar="S", help="per-request timeout in seconds")
    parser.add_argument("--label", default=None, help="name for the runs in the plot (default: the model name)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="JSON results file; the plot goes beside it as .png (default: bench_serve_<WORKLOAD>.json)")


def settings_from_args(args: argparse.Namespace) -> ServeBenchSettings:
    return ServeBenchSettings(
        url=args.url, workload=args.workload, request_rates=args.request_rate, concurrency=args.concurrency,
        num_prompts=args.num_prompts, max_tokens=args.max_tokens, model=args.model, api_key=args.api_key,
        temperature=args.temperature, ignore_eos=args.ignore_eos, extra_body=args.extra_body,
        vocab_size=args.vocab_size, seed=args.seed, warmup=args.warmup, timeout_s=args.timeout,
        progress=args.progress, label=args.label)


def run(args: argparse.Namespace) -> int:
    from .serve_metrics import format_summary
    from .serve_report import output_paths, plot_runs, write_json
    from .serve_runner import run_benchmark

    settings = settings_from_args(args)
    json_path, png_path = output_paths(args.out or f"bench_serve_{settings.workload}.json")
    command = shlex.join(["tidemind", *sys.argv[1:]])
    result = run_benchmark(settings, command=command)
    write_json(result, json_path)
    plot_runs(result, png_path)
    for r in result["runs"]:
        print(format_summary(f"{result['workload']} {r['label']}", r["summary"]))
    print(f"wrote {json_path} and {png_path}")
    failed = sum(r["summary"]["failed"] for r in result["runs"])
    if failed:
        print(f"tidemind: {failed} request(s) failed; their errors are listed above and in {json_path}",
              file=sys.stderr)
        return 1
    return 0
