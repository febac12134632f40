"""Drive one `tidemind bench serve` benchmark: warm-up, then one timed run per request rate.

`run_benchmark(settings)` returns the JSON-ready result (settings, every request's numbers, one
summary per run); `tidemind bench serve` and benchmarks/serve_vs_llamacpp.py both call it.
"""
from __future__ import annotations

import asyncio
import datetime
import os
import platform
import time
from typing import List, Optional, Tuple

import httpx

from .serve_settings import SERVE_WORKLOADS, ServeBenchSettings, arrival_offsets, rate_name, request_bodies
from .serve_client import auth_headers, choose_model, normalize_url, served_models, stream_request
from .serve_metrics import RequestRecord, summarize


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


async def _run_rate(client: httpx.AsyncClient, endpoint: str, bodies: List[dict], headers: dict,
                    settings: ServeBenchSettings, rate: float, progress) -> Tuple[List[RequestRecord], float, float]:
    """Send every body on its arrival time, at most `concurrency` in flight (0: no limit).
    Returns the records in workload order, the run's start (the first scheduled send) and its
    wall time: from that start to the end of the last response."""
    offsets = arrival_offsets(len(bodies), rate, settings.seed)
    limit = asyncio.Semaphore(settings.concurrency) if settings.concurrency else None
    records = [RequestRecord(index=i) for i in range(len(bodies))]
    start = time.perf_counter()

    async def one(i: int) -> None:
        await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
        if limit is None:
            await stream_request(client, endpoint, bodies[i], headers, records[i], settings.timeout_s)
        else:
            # TTFT counts from the send, not from the arrival: a request waiting for a free client
            # slot is the client's queue, not the server's (as in vLLM's benchmark_serving)
            async with limit:
                await stream_request(client, endpoint, bodies[i], headers, records[i], settings.timeout_s)
        progress.update(1)
        if records[i].error:
            progress.set_postfix_str(f"failed: {sum(1 for r in records if r.error)}")

    await asyncio.gather(*(one(i) for i in range(len(bodies))))
    duration = max(r.end_s for r in records) - start
    return records, start, duration


async def _warm_up(client: httpx.AsyncClient, endpoint: str, bodies: List[dict], headers: dict,
                   settings: ServeBenchSettings) -> List[dict]:
    """Short requests before timing (first-call costs: connections, lazy init). A failure here
    stops the benchmark with the server's own message (wrong key, unknown model, bad field...)."""
    done = []
    for i in range(settings.warmup):
        body = {**bodies[i % len(bodies)], "max_tokens": min(8, settings.max_tokens)}
        record = await stream_request(client, endpoint, body, headers, RequestRecord(index=i), settings.timeout_s)
        if record.error:
            raise RuntimeError(f"the warm-up request to {endpoint} failed: {record.error}")
        done.append({"e2e_s": round(record.e2e_s, 4), "output_tokens": record.output_tokens})
    return done


async def _benchmark(settings: ServeBenchSettings, transport=None) -> dict:
    from tqdm import tqdm

    base = normalize_url(settings.url)
    headers = auth_headers(settings.api_key)
    # a fresh connection per request: servers close kept-alive connections on their own terms
    # (cpp-httplib after 5 requests or 5 s idle), and a request sent on a connection being closed
    # fails without reaching the server; a loopback connect costs well under a millisecond
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    timeout = httpx.Timeout(settings.timeout_s, connect=30.0)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, transport=transport) as client:
        model = choose_model(await served_models(client, base, headers), settings.model, base)
        bodies = request_bodies(settings, model)
        endpoint = base + SERVE_WORKLOADS[settings.workload]["endpoint"]
        warmup = await _warm_up(client, endpoint, bodies, headers, settings)
        runs = []
        for rate in settings.request_rates:
            # a model id may be a file path (llama-server): its last part names it well enough
            label = f"{settings.label or model.rstrip('/').rsplit('/', 1)[-1]} rate={rate_name(rate)}"
            if settings.concurrency:
                label += f" concurrency={settings.concurrency}"
            load_before = os.getloadavg()
            with tqdm(total=len(bodies), desc=label, unit="req", disable=not settings.progress) as progress:
                records, start, duration = await _run_rate(client, endpoint, bodies, headers, settings, rate, progress)
            runs.append({"label": label, "request_rate": rate_name(rate), "concurrency": settings.concurrency,
                         "loadavg_before": [round(x, 2) for x in load_before],
                         "summary": summarize(records, duration),
                         "requests": [r.to_json(start) for r in records]})
    return {"model": model, "endpoint": endpoint, "warmup": warmup, "runs": runs}


def run_benchmark(settings: ServeBenchSettings, command: Optional[str] = None, transport=None) -> dict:
    """Run the workload against the server; the result holds everything needed to reproduce and
    re-analyse it (settings, command, every request's timings). `transport`: an httpx transport
    to use instead of the network (tests)."""
    from dataclasses import asdict

    from .. import __version__ as tidemind_version

    settings = settings.resolved()
    started = _now()
    body = asyncio.run(_benchmark(settings, transport))
    recorded = asdict(settings)
    recorded.pop("api_key")  # never written to results files
    recorded["request_rates"] = [rate_name(r) for r in settings.request_rates]
    return {
        "benchmark": "tidemind bench serve",
        "workload": settings.workload,
        "workload_description": SERVE_WORKLOADS[settings.workload]["description"],
        "command": command,
        "url": normalize_url(settings.url),
        **body,
        "started_at": started,
        "finished_at": _now(),
        "client": {"host": platform.node(), "python": platform.python_version(), "httpx": httpx.__version__,
                   "tidemind": tidemind_version, "cpu_count": os.cpu_count()},
        "settings": recorded,
    }
