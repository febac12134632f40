"""`tidemind bench serve`: benchmarks with JSON results and PNG plots.

Each verb's module provides `add_arguments(parser)` and `run(args)` with light top-level imports.
"""
from __future__ import annotations

import importlib

BENCH_COMMANDS = {
    "serve": ("tidemind.bench.serve", "load an OpenAI-compatible server with the S1 / C2 workloads"),
}


def add_commands(commands) -> None:
    bench = commands.add_parser("bench", help="reproducible benchmarks (JSON + PNG)")
    verbs = bench.add_subparsers(dest="bench_command", metavar="VERB")
    verbs.required = True
    for verb, (module_name, help_text) in BENCH_COMMANDS.items():
        module = importlib.import_module(module_name)
        parser = verbs.add_parser(verb, help=help_text, description=help_text)
        module.add_arguments(parser)
        parser.set_defaults(handler=module.run)
