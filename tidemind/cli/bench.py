"""`tidemind bench {latency,throughput,serve,reliability}`: benchmarks with JSON results and PNG
plots; each verb's module provides `add_arguments(parser)` and `run(args)` and is imported only when
the verb runs."""
from __future__ import annotations

from .lazy import add_lazy_group

BENCH_COMMANDS = {
    "latency": ("tidemind.bench.latency", "one request at a time: decode speed (D1), long-prompt TTFT (L1)"),
    "throughput": ("tidemind.bench.throughput", "many requests at once through the engine (T1)"),
    "serve": ("tidemind.bench.serve", "load an OpenAI-compatible server with the S1 / C2 workloads"),
    "reliability": ("tidemind.bench.reliability", "soak, overload, bad input, faults and proxy failover against "
                                                  "real local servers, with verdicts"),
}


def add_commands(commands) -> None:
    add_lazy_group(commands, "bench", "reproducible benchmarks (JSON + PNG)", BENCH_COMMANDS, extra="bench")
