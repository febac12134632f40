"""Fault injection (TIDEMIND_INJECT_FAULTS, tidemind/engine/faults.py) into api_servers under
concurrent greedy streams, one server per fault:

1. one request: making one token's output fails (`output=K`, K in the middle of the load): that
   request's stream ends with an error event, every other stream equals its solo text;
2. one step: a step fails (`execute=K`, at most 2 requests per step): the requests of that step fail,
   the others, waiting meanwhile, finish with their solo texts; the server stays healthy;
3. the engine cannot go on (`execute=K,recovery=1`: the clean-up of the failed step fails too): every
   open stream ends at once with an error event (a request that comes after gets 503), /health
   answers 503 until the process exits with code 1, within `exit_bound_s`.

Error events and 5xx bodies must not show the internal exception (InjectedFault). The solo texts
come from the first server, once its one-shot fault has fired.
"""
from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import httpx

from .local_servers import LocalServer, api_server_command, free_port, started
from .reliability_common import (CHAT_PATH, ScenarioResult, StreamRecord, answers_normally, greedy_body, http_client,
                                 kv_figures, solo_records, stream, wait_idle)
from .workloads import chat_prompts

FAULTS_ENV = "TIDEMIND_INJECT_FAULTS"


@dataclass(frozen=True)
class FaultSettings:
    streams: int = 4
    max_tokens: int = 24
    error_bound_s: float = 5.0  # from the fault to the last open stream's end
    exit_bound_s: float = 30.0  # from the fault to the process's exit


SCALES = {"ci": FaultSettings(max_tokens=16), "full": FaultSettings(streams=12, max_tokens=48)}


def _bodies(settings: FaultSettings) -> Dict[int, Tuple[str, dict]]:
    return {i: (CHAT_PATH, greedy_body(CHAT_PATH, prompt, settings.max_tokens, ignore_eos=True))
            for i, prompt in enumerate(chat_prompts()[:settings.streams])}


async def _concurrent(url: str, bodies: Dict[int, Tuple[str, dict]]) -> List[StreamRecord]:
    async with http_client(timeout=120.0) as client:
        return list(await asyncio.gather(*(stream(client, url, path, body) for path, body in bodies.values())))


def _start(stack: contextlib.ExitStack, workdir: Path, name: str, faults: str, env: Optional[dict],
           *extra: str) -> LocalServer:
    """An api_server with a fault plan, started (not yet ready) and stopped when `stack` closes."""
    port = free_port()
    command = api_server_command(port, "--session-len", "512", *extra)
    return stack.enter_context(started(command, port, workdir / f"faults-{name}-server.log",
                                       {**(env or {}), FAULTS_ENV: faults}))


def _leaks(records: List[StreamRecord]) -> List[str]:
    return [r.summary() for r in records if "InjectedFault" in str(r.error_event or r.error_body or "")]


def _judge_contained(result: ScenarioResult, label: str, records: List[StreamRecord], solo: Dict[int, StreamRecord],
                     most_failed: int) -> dict:
    failed = [i for i, r in enumerate(records) if r.error_event is not None]
    others_equal = [i for i, r in enumerate(records) if i not in failed and r.completed
                    and (r.text, r.finish_reason) == (solo[i].text, solo[i].finish_reason)]
    result.check(f"{label}: 1 to {most_failed} streams end with an error event",
                 1 <= len(failed) <= most_failed and all(records[i].status == 200 for i in failed),
                 f"failed: {[records[i].summary() for i in failed]}")
    result.check(f"{label}: every other stream equals its solo text", len(others_equal) + len(failed) == len(records),
                 f"{len(others_equal)}/{len(records) - len(failed)} equal")
    result.check(f"{label}: no internal text in what clients saw", not _leaks(records), "; ".join(_leaks(records))
                 or "the error events carry a request id only")
    return {"streams": len(records), "failed": len(failed), "others_equal_solo": len(others_equal)}


def _judge_still_serving(result: ScenarioResult, label: str, server: LocalServer) -> dict:
    idle, m, waited = wait_idle(server.url)
    result.check(f"{label}: afterwards every KV block free", idle, f"{kv_figures(m)} {waited:.2f} s after")
    ok, answer = answers_normally(server.url)
    health = httpx.get(f"{server.url}/health", timeout=10).status_code
    result.check(f"{label}: afterwards healthy and answering", ok and health == 200 and server.process.poll() is None,
                 f"/health {health}; a normal request: {answer[:80]}")
    return {"kv_free_after": m["tidemind_kv_cache_blocks_free"]}


def _one_request(settings: FaultSettings, server: LocalServer,
                 result: ScenarioResult) -> Tuple[Dict[int, StreamRecord], dict]:
    bodies = _bodies(settings)
    records = asyncio.run(_concurrent(server.url, bodies))
    solo = asyncio.run(solo_records(server.url, bodies))  # the one-shot fault has fired
    figures = _judge_contained(result, "one request", records, solo, most_failed=1)
    figures.update(_judge_still_serving(result, "one request", server))
    return solo, figures


def _one_step(settings: FaultSettings, server: LocalServer, result: ScenarioResult,
              solo: Dict[int, StreamRecord]) -> dict:
    records = asyncio.run(_concurrent(server.url, _bodies(settings)))
    figures = _judge_contained(result, "one step", records, solo, most_failed=2)
    figures.update(_judge_still_serving(result, "one step", server))
    return figures


def _health_until_exit(server: LocalServer, deadline: float) -> List[str]:
    """/health answers (or 'refused') until the process exits or the deadline passes."""
    seen: List[str] = []
    while server.process.poll() is None and time.monotonic() < deadline:
        try:
            answer = str(httpx.get(f"{server.url}/health", timeout=2).status_code)
        except httpx.HTTPError:
            answer = "refused"
        if not seen or seen[-1] != answer:
            seen.append(answer)
        time.sleep(0.1)
    return seen


def _engine_death(settings: FaultSettings, server: LocalServer, result: ScenarioResult) -> dict:
    records = asyncio.run(_concurrent(server.url, _bodies(settings)))
    first_error = min((r.ended_s for r in records if not r.completed), default=None)
    health = _health_until_exit(server, time.monotonic() + settings.exit_bound_s)
    exited_s = time.monotonic()
    code = server.process.poll()
    open_streams = [r for r in records if not r.completed]
    spread = max(r.ended_s for r in open_streams) - first_error if open_streams else float("nan")
    # A request that arrives after the engine died is refused with 503 engine_dead instead.
    ended_cleanly = [r for r in records
                     if r.error_event is not None or (r.status, r.error_code) == (503, "engine_dead")]
    result.check("engine death: every stream ends at once with an error event (or a 503 if it came late)",
                 len(ended_cleanly) == len(records) and spread <= settings.error_bound_s,
                 f"{sum(r.error_event is not None for r in records)} error events, "
                 f"{len(ended_cleanly) - sum(r.error_event is not None for r in records)} 503s of {len(records)}, "
                 f"within {spread:.2f} s (bound {settings.error_bound_s:g} s); first: {records[0].summary()}")
    result.check("engine death: no internal text in what clients saw", not _leaks(records),
                 "; ".join(_leaks(records)) or "the error events carry a request id only")
    result.check("engine death: /health 503 until the process exits", set(health) <= {"503", "refused"},
                 f"/health answers in turn: {health}")
    exit_s = exited_s - first_error if first_error is not None else float("nan")
    result.check("engine death: the process exits with code 1 in time",
                 code == 1 and exit_s <= settings.exit_bound_s,
                 f"exit code {code} {exit_s:.1f} s after the fault (bound {settings.exit_bound_s:g} s)")
    log = server.log_tail(chars=10**6)
    result.check("engine death: the log says why", "the engine stopped" in log and "InjectedFault" in log,
                 "the log names the engine's stop and the exception")
    return {"streams": len(records), "error_events": sum(r.error_event is not None for r in records),
            "error_spread_s": round(spread, 3), "health_seen": health, "exit_code": code,
            "exit_after_fault_s": round(exit_s, 2)}


def run(settings: FaultSettings, workdir: Path, progress: bool = False, env: Optional[dict] = None) -> ScenarioResult:
    result = ScenarioResult("faults", asdict(settings))
    mid_load = settings.max_tokens // 2  # outputs: one per token per request; steps: one per token
    with contextlib.ExitStack() as stack:  # the three servers load side by side
        per_request = _start(stack, workdir, "output", f"output={settings.streams * mid_load}", env)
        per_step = _start(stack, workdir, "step", f"execute={mid_load}", env, "--max-batch-size", "2")
        fatal = _start(stack, workdir, "dead", f"execute={mid_load},recovery=1", env)
        solo, one_request = _one_request(settings, per_request.wait_healthy(), result)
        one_step = _one_step(settings, per_step.wait_healthy(), result, solo)
        death = _engine_death(settings, fatal.wait_healthy(), result)
    result.figures = {"one_request": one_request, "one_step": one_step, "engine_death": death}
    return result
