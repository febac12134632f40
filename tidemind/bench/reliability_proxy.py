"""Proxy failover: a proxy with a registration key in front of two api_servers that register
themselves, under streaming load through the proxy; mid-load, while streams run on it, node B is
killed (SIGKILL).

Checks: the streams running on B end at once with the proxy's `node_disconnected` error event
(never a hang); requests that could not start on B are sent to A (the proxy counts them as retried:
every failed start on B); every other request completes with its solo greedy text; the proxy marks
B unhealthy; afterwards new requests all succeed on A, whose KV blocks are all free at the end.

The proxy's periodic health checks are off during the scenario (an interval of 600 s), so that the
proxy learns of B's death from the requests alone: once B's streams have broken, B has nothing in
flight and the next requests go there (the lowest expected latency), fail to start and are retried.
With checks every second, a check could come first and spare the retry path its test. (Dropping a
node after three failed checks is tests/test_proxy_e2e.py's.)
"""
from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

import httpx

from .local_servers import LocalServer, api_server_command, free_port, local_server, started
from .reliability_common import (CHAT_PATH, ScenarioResult, StreamRecord, greedy_body, http_client, kv_figures,
                                 progress_bar, solo_records, stream, wait_idle)
from .workloads import chat_prompts

REGISTRATION_KEY_ENV = "TIDEMIND_PROXY_REGISTRATION_KEY"


@dataclass(frozen=True)
class ProxyFailoverSettings:
    requests: int = 32
    concurrency: int = 8
    prompts: int = 4
    max_tokens: int = 24
    kill_after: int = 8  # completed requests before node B is killed (once a stream runs on it)
    after_requests: int = 8  # sent once the load has ended
    error_bound_s: float = 5.0  # from the kill to the end of the last stream that ran on B
    unhealthy_bound_s: float = 10.0  # from the kill to the proxy marking B unhealthy


SCALES = {"ci": ProxyFailoverSettings(),
          "full": ProxyFailoverSettings(requests=300, concurrency=16, prompts=8, max_tokens=32, kill_after=100,
                                        after_requests=32)}


def _nodes(proxy: str) -> Dict[str, dict]:
    answer = httpx.get(f"{proxy}/nodes/status", timeout=10, trust_env=False).json()
    return {n["url"]: n for n in answer["nodes"]}


def _wait_for(condition, timeout: float, interval: float = 0.1) -> Optional[float]:
    """Seconds until condition() held, or None if it did not within `timeout`."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(interval)
    return None


@contextlib.contextmanager
def _cluster(workdir: Path, env: Optional[dict]):
    """(proxy URL, node A, node B): both nodes registered themselves with the registration key."""
    from ..loader.resolve import resolve_model

    resolve_model(None)  # converts the bundled GGUF once here, not in both nodes at the same time
    env = {**(env or {}), REGISTRATION_KEY_ENV: secrets.token_hex(16)}
    port = free_port()
    proxy_command = ["serve", "proxy", "--server-name", "127.0.0.1", "--server-port", str(port),
                     "--health-check-interval", "600", "--log-level", "INFO"]
    with local_server(proxy_command, port, workdir / "proxy.log", env=env) as proxy, contextlib.ExitStack() as stack:
        nodes = []
        for name in ("a", "b"):  # they load side by side
            node_port = free_port()
            command = api_server_command(node_port, "--session-len", "512", "--proxy-url", proxy.url)
            nodes.append(stack.enter_context(started(command, node_port, workdir / f"proxy-node-{name}.log", env)))
        for node in nodes:
            node.wait_healthy()
        registered = _wait_for(lambda: set(_nodes(proxy.url)) == {n.url for n in nodes}, timeout=30)
        if registered is None:
            raise RuntimeError(f"the nodes did not register with the proxy: {_nodes(proxy.url)}\n{proxy.log_tail()}")
        yield proxy.url, nodes[0], nodes[1]


async def _kill_and_watch(client: httpx.AsyncClient, proxy: str, victim: LocalServer,
                          settings: ProxyFailoverSettings, done: List[int], kill: dict) -> None:
    """Kill the victim (SIGKILL) once `kill_after` requests have completed and one is in flight on
    it; then note when the proxy marks it unhealthy (seconds after the kill)."""
    while True:
        nodes = {n["url"]: n for n in (await client.get(f"{proxy}/nodes/status")).json()["nodes"]}
        node = nodes[victim.url]
        if "at" not in kill:
            if done[0] >= settings.kill_after and node["in_flight"] >= 1:
                victim.process.kill()
                kill.update(at=time.monotonic(), in_flight=node["in_flight"], completed_before=done[0])
        elif not node["healthy"] or time.monotonic() - kill["at"] > settings.unhealthy_bound_s:
            if not node["healthy"]:
                kill["unhealthy_after_s"] = round(time.monotonic() - kill["at"], 2)
            return
        await asyncio.sleep(0.05)


async def _load(proxy: str, requests: List[dict], settings: ProxyFailoverSettings, progress: bool,
                victim: Optional[LocalServer] = None, kill: Optional[dict] = None) -> List[StreamRecord]:
    """Stream `requests` through the proxy; with a `victim`, kill it mid-load (_kill_and_watch)."""
    gate = asyncio.Semaphore(settings.concurrency)
    done = [0]
    async with http_client(timeout=120.0) as client:
        async def one(body: dict) -> StreamRecord:
            async with gate:
                record = await stream(client, proxy, CHAT_PATH, body)
                done[0] += 1
                bar.update(1)
                return record

        with progress_bar(len(requests), "proxy failover", progress) as bar:
            watcher = asyncio.ensure_future(_kill_and_watch(client, proxy, victim, settings, done, kill)
                                            if victim is not None else asyncio.sleep(0))
            records = await asyncio.gather(*(one(body) for body in requests))
        if kill is None or "at" not in kill:  # never killed: nothing to watch
            watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    return list(records)


def _judge_load(result: ScenarioResult, records: List[StreamRecord], keys: List[int], solo: Dict[int, StreamRecord],
                kill: dict, settings: ProxyFailoverSettings) -> dict:
    broken = [r for r in records if r.error_code == "node_disconnected"]
    others = [(k, r) for k, r in zip(keys, records) if r.error_code != "node_disconnected"]
    result.check("node B was killed while streams ran on it", "at" in kill,
                 f"killed with {kill.get('in_flight')} request(s) in flight on it after "
                 f"{kill.get('completed_before')} completed" if "at" in kill else "B never had a stream to kill")
    late = max((r.ended_s - kill["at"] for r in broken), default=0.0) if "at" in kill else float("nan")
    result.check("streams running on B end at once with node_disconnected",
                 1 <= len(broken) <= kill.get("in_flight", 0) and late <= settings.error_bound_s
                 and all(r.status == 200 and not r.done for r in broken),
                 f"{len(broken)} stream(s) ended with the error event, the last {late:.2f} s after the kill "
                 f"(bound {settings.error_bound_s:g} s)")
    wrong = [(k, r) for k, r in others if not r.completed or (r.text, r.finish_reason) !=
             (solo[k].text, solo[k].finish_reason)]
    result.check("every other request completes with its solo text (no 5xx, no hang)", not wrong,
                 f"{len(others) - len(wrong)}/{len(others)}" + (f"; first: {wrong[0][1].summary()}" if wrong else ""))
    return {"requests": len(records), "node_disconnected": len(broken), "completed": len(others) - len(wrong),
            "in_flight_on_b_at_kill": kill.get("in_flight"), "last_broken_stream_after_kill_s": round(late, 3)}


def _judge_table(result: ScenarioResult, proxy: str, a: LocalServer, b: LocalServer, kill: dict,
                 settings: ProxyFailoverSettings) -> dict:
    status = httpx.get(f"{proxy}/nodes/status", timeout=10, trust_env=False).json()
    nodes = {n["url"]: n for n in status["nodes"]}
    failed_starts = nodes[b.url]["failed_starts"]
    result.check("requests that could not start on B were retried on A",
                 status["retried_requests"] == failed_starts >= 1,
                 f"{failed_starts} failed start(s) on B, {status['retried_requests']} request(s) retried")
    unhealthy = kill.get("unhealthy_after_s")
    result.check("the proxy marks B unhealthy", unhealthy is not None and not nodes[b.url]["healthy"],
                 f"{unhealthy} s after the kill (bound {settings.unhealthy_bound_s:g} s)")
    return {"failed_starts_on_b": failed_starts, "retried_requests": status["retried_requests"],
            "unhealthy_after_kill_s": unhealthy, "served": {"a": nodes[a.url]["served"], "b": nodes[b.url]["served"]}}


def run(settings: ProxyFailoverSettings, workdir: Path, progress: bool = False,
        env: Optional[dict] = None) -> ScenarioResult:
    result = ScenarioResult("proxy failover", asdict(settings))
    prompts = chat_prompts()[:settings.prompts]
    bodies = {i: (CHAT_PATH, greedy_body(CHAT_PATH, p, settings.max_tokens, ignore_eos=True))
              for i, p in enumerate(prompts)}
    keys = [i % len(prompts) for i in range(settings.requests)]
    kill: dict = {}
    with _cluster(workdir, env) as (proxy, a, b):
        solo = asyncio.run(solo_records(a.url, bodies))
        records = asyncio.run(_load(proxy, [bodies[k][1] for k in keys], settings, progress, victim=b, kill=kill))
        figures = _judge_load(result, records, keys, solo, kill, settings)
        figures.update(_judge_table(result, proxy, a, b, kill, settings))
        served_before = _nodes(proxy)[a.url]["served"]
        after_keys = [i % len(prompts) for i in range(settings.after_requests)]
        after = asyncio.run(_load(proxy, [bodies[k][1] for k in after_keys], settings, progress=False))
        served_after = _nodes(proxy)[a.url]["served"] - served_before
        wrong = [r for k, r in zip(after_keys, after) if not r.completed or r.text != solo[k].text]
        result.check("afterwards new requests all succeed on A", not wrong and served_after == len(after),
                     f"{len(after) - len(wrong)}/{len(after)} completed with their solo text, {served_after} "
                     f"served by A")
        idle, m, waited = wait_idle(a.url)
        result.check("afterwards A is idle with every KV block free", idle, f"{kv_figures(m)} {waited:.2f} s after")
    figures["after_the_load"] = {"requests": len(after), "completed": len(after) - len(wrong)}
    result.figures = figures
    return result
