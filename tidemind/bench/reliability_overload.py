"""Overload: more concurrent generation requests than --max-concurrent-requests, all at once.

Checks, every round: exactly the limit are answered (200), every other request is refused with 429
(`rate_limit_exceeded`, `Retry-After: 1`) without waiting for a slot, i.e. before the first answer
ends; while the limit's requests still run, single requests sent one by one are refused within
`rejection_bound_s` each (the burst's own refusals also measure how fast 200 connections are
accepted on a busy machine, so they are reported, not bounded); /metrics counts every refusal;
afterwards no slot is held, every KV block is free, and the server answers a normal request. Half
the requests stream and half do not: both ways of releasing a slot are exercised, round after round.

The answered requests generate `max_tokens` tokens (ignore_eos), which takes seconds on a CPU,
long enough for all the others to arrive meanwhile; the check that every refusal ended before the
first answer did shows that this held.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import httpx

from .local_servers import local_api_server, metrics
from .reliability_common import (CHAT_PATH, ScenarioResult, StreamRecord, answers_normally, greedy_body, http_client,
                                 kv_figures, stream, wait_idle)


@dataclass(frozen=True)
class OverloadSettings:
    requests: int = 200
    limit: int = 16
    rounds: int = 1
    max_tokens: int = 48
    probes: int = 10  # single requests over the limit, sent one by one while the limit's requests run
    rejection_bound_s: float = 1.0
    idle_timeout_s: float = 10.0  # for every KV block to be free again once the last response ended


SCALES = {"ci": OverloadSettings(), "full": OverloadSettings(rounds=5)}


async def _post(client: httpx.AsyncClient, url: str, body: dict) -> StreamRecord:
    """A non-streamed request, recorded like a stream."""
    record = StreamRecord(sent_s=time.monotonic())
    try:
        response = await client.post(f"{url}{CHAT_PATH}", json=body)
        record.status, record.headers = response.status_code, dict(response.headers)
        payload = response.json()
        if response.status_code == 200:
            choice = payload["choices"][0]
            record.text, record.finish_reason, record.done = choice["message"]["content"], choice["finish_reason"], True
        else:
            record.error_body = payload
    except (httpx.HTTPError, ValueError) as exc:
        record.transport_error = f"{type(exc).__name__}: {exc}"
    record.ended_s = time.monotonic()
    return record


async def _burst(url: str, settings: OverloadSettings) -> Tuple[List[StreamRecord], List[StreamRecord]]:
    """(the burst's records, the probes' records)."""
    async with http_client(timeout=300.0) as client:
        def request(i: int):
            body = greedy_body(CHAT_PATH, f"Count from {i} to {i + 100}.", settings.max_tokens, stream=i % 2 == 0,
                               ignore_eos=True)
            return stream(client, url, CHAT_PATH, body) if body["stream"] else _post(client, url, body)

        burst = [asyncio.ensure_future(request(i)) for i in range(settings.requests)]
        while sum(t.done() for t in burst) < settings.requests - settings.limit:  # the refusals are back
            await asyncio.sleep(0.05)
        probe = greedy_body(CHAT_PATH, "Hi", 2, stream=False)
        probes = [await _post(client, url, probe) for _ in range(settings.probes)]
        return list(await asyncio.gather(*burst)), probes


def _judge_round(result: ScenarioResult, records: List[StreamRecord], probes: List[StreamRecord],
                 settings: OverloadSettings, label: str, rejected_counted: float) -> dict:
    served = [r for r in records if r.completed]
    refused = [r for r in records if r.status == 429]
    other = [r for r in records if not r.completed and r.status != 429]
    result.check(f"{label}: exactly the limit answered, the rest 429",
                 len(served) == settings.limit and len(refused) == settings.requests - settings.limit and not other,
                 f"{len(served)} answered, {len(refused)} refused with 429, {len(other)} other"
                 + (f" (first: {other[0].summary()})" if other else ""))
    well_formed = [r for r in refused if r.headers.get("retry-after") == "1" and r.error_code == "rate_limit_exceeded"]
    result.check(f"{label}: every 429 says rate_limit_exceeded and Retry-After: 1", len(well_formed) == len(refused),
                 f"{len(well_formed)}/{len(refused)}")
    waits = sorted(r.ended_s - r.sent_s for r in refused)
    first_answer = min((r.ended_s for r in served), default=float("inf"))
    last_refusal = max((r.ended_s for r in refused), default=0.0)
    result.check(f"{label}: no refusal waited for a slot", bool(refused) and last_refusal < first_answer,
                 f"the last 429 came {first_answer - last_refusal:.2f} s before the first answer ended")
    probe_waits = sorted(r.ended_s - r.sent_s for r in probes)
    result.check(f"{label}: a request over the limit is refused at once",
                 all(r.status == 429 for r in probes) and probe_waits[-1] <= settings.rejection_bound_s,
                 f"{sum(r.status == 429 for r in probes)}/{len(probes)} single requests refused, the slowest in "
                 f"{probe_waits[-1]:.3f} s (bound {settings.rejection_bound_s:g} s)")
    result.check(f"{label}: /metrics counted the refusals", rejected_counted == len(refused) + len(probes),
                 f"tidemind_http_requests_rejected_total +{rejected_counted:.0f}")
    start = min(r.sent_s for r in records)
    return {"answered": len(served), "refused_429": len(refused), "other": len(other),
            "refusal_p50_s": round(waits[len(waits) // 2], 3) if waits else None,
            "refusal_max_s": round(waits[-1], 3) if waits else None,
            "single_refusal_p50_s": round(probe_waits[len(probe_waits) // 2], 4),
            "single_refusal_max_s": round(probe_waits[-1], 4),
            "first_answer_s": round(first_answer - start, 2) if served else None}


def run(settings: OverloadSettings, workdir: Path, progress: bool = False,
        env: Optional[dict] = None) -> ScenarioResult:
    result = ScenarioResult("overload", asdict(settings))
    rounds = []
    with local_api_server("--session-len", "512", "--max-concurrent-requests", str(settings.limit),
                          log_path=workdir / "overload-server.log", env=env) as server:
        for n in range(settings.rounds):
            label = f"round {n + 1}" if settings.rounds > 1 else "burst"
            rejected_before = metrics(server.url)["tidemind_http_requests_rejected_total"]
            records, probes = asyncio.run(_burst(server.url, settings))
            idle, m, waited = wait_idle(server.url, settings.idle_timeout_s)
            figures = _judge_round(result, records, probes, settings, label,
                                   m["tidemind_http_requests_rejected_total"] - rejected_before)
            result.check(f"{label}: afterwards no slot held and every KV block free", idle,
                         f"{kv_figures(m)} {waited:.2f} s after the last response")
            ok, answer = answers_normally(server.url)
            result.check(f"{label}: afterwards a normal request is answered", ok, answer)
            rounds.append(figures)
        health = httpx.get(f"{server.url}/health", timeout=10)
        result.check("healthy at the end", health.status_code == 200, f"/health {health.status_code}")
    result.figures = {"rounds": rounds}
    return result
