"""`tidemind bench reliability`: scenarios that start real servers on loopback (the bundled SmolLM2,
CPU, float32) and give each a pass/fail verdict with its figures: a streaming soak with clients
hanging up, overload past --max-concurrent-requests, a bad-input corpus, fault injection, and proxy
failover with a node killed mid-stream. RELIABILITY.md holds the figures and what they mean.

`--scale ci` is the size CI runs (tests/test_reliability.py), `--scale full` the size of the
figures in RELIABILITY.md. Results: a JSON file (settings, figures, every check) and a table.
"""
from __future__ import annotations

import argparse
import importlib
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .reliability_common import ScenarioResult

# name -> (module, what it tries)
SCENARIOS = {
    "soak": ("tidemind.bench.reliability_soak", "streamed requests, a share of clients hanging up mid-stream"),
    "overload": ("tidemind.bench.reliability_overload", "more concurrent requests than --max-concurrent-requests"),
    "bad-input": ("tidemind.bench.reliability_corpus", "malformed and hostile requests, random mutants"),
    "faults": ("tidemind.bench.reliability_faults", "injected failures of a request, a step, the engine"),
    "proxy": ("tidemind.bench.reliability_proxy", "a proxy over two nodes, one killed mid-stream"),
}
SCALES = ("ci", "full")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scale", choices=SCALES, default="ci",
                        help="ci: the sizes CI runs (a few minutes on 2 cores); full: the sizes of RELIABILITY.md")
    parser.add_argument("--scenarios", nargs="+", choices=tuple(SCENARIOS), default=list(SCENARIOS), metavar="NAME",
                        help=f"scenarios to run, in this order (default: all: {', '.join(SCENARIOS)})")
    parser.add_argument("--out", default=None, metavar="PATH",
                        help="JSON results file (default: reliability_<scale>.json); the servers' logs go to "
                             "the folder beside it named <PATH without .json>-logs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--server-arg", dest="server_args", action="append", default=[], metavar="ARG",
                        help="a flag every api_server of the run gets, repeatable; e.g. --server-arg=--engine-process "
                             "runs each server's engine in a process of its own")


def run_scenario(name: str, scale: str, workdir: Path, progress: bool = False, env: Optional[Dict[str, str]] = None,
                 settings=None) -> ScenarioResult:
    """One scenario at a scale (or with `settings` of its own); an exception that stops it is part of
    its result, never lost. `env` is added to its servers' environment."""
    module = importlib.import_module(SCENARIOS[name][0])
    settings = settings if settings is not None else module.SCALES[scale]
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    try:
        result = module.run(settings, workdir, progress=progress, env=env)
    except Exception as exc:  # a server that did not start, a broken connection: the verdict says so
        where = traceback.extract_tb(exc.__traceback__)[-1]
        result = ScenarioResult(name, asdict(settings), error=f"{type(exc).__name__}: {exc} (at "
                                                              f"{Path(where.filename).name}:{where.lineno})")
    result.name = name
    result.seconds = time.monotonic() - started
    return result


def _versions() -> dict:
    from .. import __version__

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    import torch

    return {"tidemind": __version__, "git_rev": git("rev-parse", "HEAD") or None,
            "uncommitted_files": len(git("status", "--porcelain").splitlines()), "torch": torch.__version__,
            "python": platform.python_version()}


def report(results: Sequence[ScenarioResult]) -> str:
    """A short table: each scenario's verdict and seconds, then every check that failed."""
    lines = ["| scenario | verdict | checks | seconds |", "|---|---|---|---|"]
    for r in results:
        verdict = "PASS" if r.passed else "FAIL"
        lines.append(f"| {r.name} | {verdict} | {sum(c.passed for c in r.checks)}/{len(r.checks)} | {r.seconds:.0f} |")
    for r in results:
        if r.error:
            lines.append(f"{r.name}: could not run to its end: {r.error}")
        for c in r.checks:
            if not c.passed:
                lines.append(f"{r.name}: FAILED {c.name}: {c.detail}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from .local_servers import EXTRA_API_SERVER_ARGS
    from .serve_report import output_paths, write_json

    json_path, _ = output_paths(args.out or f"reliability_{args.scale}.json")
    logs = json_path.with_name(json_path.stem + "-logs")
    EXTRA_API_SERVER_ARGS[:] = args.server_args
    load_start = os.getloadavg()
    # Ctrl-C raises KeyboardInterrupt wherever the main thread is. (asyncio.run would turn it into a
    # cancellation of its task, which httpx's connection pool can swallow: the suite would go on.)
    signal.signal(signal.SIGINT, _interrupt)
    results: List[ScenarioResult] = []
    interrupted = False
    try:
        for name in args.scenarios:
            print(f"{name}: {SCENARIOS[name][1]} ({args.scale} scale)", file=sys.stderr, flush=True)
            results.append(run_scenario(name, args.scale, logs, progress=args.progress))
            print(f"{name}: {'PASS' if results[-1].passed else 'FAIL'} in {results[-1].seconds:.0f} s",
                  file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # the servers of the scenario that ran have been stopped on the way out
        interrupted = True
    write_json({"command": shlex.join(["tidemind", *sys.argv[1:]]), "scale": args.scale, "interrupted": interrupted,
                "date": time.strftime("%Y-%m-%d %H:%M:%S"), "versions": _versions(),
                "machine": {"cpu_count": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load_start],
                            "loadavg_end": [round(x, 2) for x in os.getloadavg()]},
                "passed": not interrupted and all(r.passed for r in results),
                "scenarios": [r.as_dict() for r in results]}, json_path)
    print(report(results))
    print(f"wrote {json_path} (server logs in {logs})" + ("; interrupted: the scenarios after these did not run"
                                                          if interrupted else ""))
    if interrupted:
        return 130
    return 0 if all(r.passed for r in results) else 1


def _interrupt(signum, frame):
    raise KeyboardInterrupt
