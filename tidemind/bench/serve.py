"""`tidemind bench serve`: load any OpenAI-compatible server with the S1 / C2 workloads
(benchmarks/WORKLOADS.md) and measure TTFT, TPOT, ITL and throughput from the client side.

Top-level imports stay light (the CLI imports this module to build its parser); httpx, numpy,
matplotlib and tqdm load inside `run`.
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from dataclasses import asdict, dataclass, field
from typing import List, Optional

# the workloads' defaults; concurrency 0 = no limit on requests in flight
SERVE_WORKLOADS = {
    "C2": dict(endpoint="/v1/chat/completions", num_prompts=32, max_tokens=128, rates=[math.inf], concurrency=16,
               description="the 32 chat prompts of benchmarks/prompts.jsonl, 16 concurrent streaming clients, "
                           "128 new tokens, ignore EOS"),
    "S1": dict(endpoint="/v1/completions", num_prompts=512, max_tokens=256, rates=[4.0, 16.0, math.inf],
               concurrency=0,
               description="the T1 requests (512 prompts of random token ids, lengths 128-1024, seed 0) as "
                           "token-id prompts, 256 new tokens, ignore EOS, Poisson arrivals (seed 0), streaming"),
}


@dataclass
class ServeBenchSettings:
    url: str
    workload: str = "C2"
    request_rates: Optional[List[float]] = None  # None: the workload's
    concurrency: Optional[int] = None  # None: the workload's; 0: unlimited
    num_prompts: Optional[int] = None
    max_tokens: Optional[int] = None
    model: Optional[str] = None  # None: the first model the server lists
    api_key: Optional[str] = None
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: dict = field(default_factory=dict)
    vocab_size: int = 49152  # S1's random token ids are drawn below this
    seed: int = 0
    warmup: int = 1
    timeout_s: float = 600.0
    progress: bool = True
    label: Optional[str] = None  # names the runs in plots (e.g. the server)

    def resolved(self) -> "ServeBenchSettings":
        """A copy with the workload's defaults filled in and the values checked."""
        if self.workload not in SERVE_WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose one of {sorted(SERVE_WORKLOADS)}")
        spec = SERVE_WORKLOADS[self.workload]
        out = ServeBenchSettings(**{**asdict(self), "extra_body": dict(self.extra_body)})
        out.request_rates = list(self.request_rates or spec["rates"])
        out.concurrency = spec["concurrency"] if self.concurrency is None else self.concurrency
        out.num_prompts = spec["num_prompts"] if self.num_prompts is None else self.num_prompts
        out.max_tokens = spec["max_tokens"] if self.max_tokens is None else self.max_tokens
        if any(not r > 0 for r in out.request_rates):
            raise ValueError("--request-rate values must be > 0 (or inf: all requests at once)")
        if out.concurrency < 0 or out.num_prompts < 1 or out.max_tokens < 1:
            raise ValueError("--concurrency must be >= 0, --num-prompts and --max-tokens >= 1")
        return out


def request_bodies(settings: ServeBenchSettings, model: str) -> List[dict]:
    """The workload's request bodies, in order. C2 cycles through the 32 chat prompts when asked for
    more; S1 takes the first `num_prompts` T1 prompts (at most 512)."""
    from .workloads import chat_prompts, t1_prompts

    common = {"model": model, "max_tokens": settings.max_tokens, "temperature": settings.temperature,
              "stream": True, "stream_options": {"include_usage": True}}
    if settings.ignore_eos:
        common["ignore_eos"] = True  # tidemind, vLLM and llama.cpp's llama-server all read it
    common.update(settings.extra_body)
    if settings.workload == "C2":
        prompts = chat_prompts()
        return [{**common, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
                for i in range(settings.num_prompts)]
    if settings.num_prompts > 512:
        raise ValueError("S1 has 512 requests; pass --num-prompts 512 or fewer")
    return [{**common, "prompt": ids} for ids in t1_prompts(settings.vocab_size, settings.num_prompts)]


def arrival_offsets(count: int, rate: float, seed: int) -> List[float]:
    """Send times (seconds from the run's start): a Poisson process of `rate` requests/s, the first
    request at 0; rate inf sends everything at once."""
    if math.isinf(rate):
        return [0.0] * count
    import numpy as np

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count)
    return [0.0] + np.cumsum(gaps[:-1]).tolist()


def rate_name(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


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
