"""Streaming soak: many greedy streamed requests (chat and completions, varied prompts and lengths) at
a fixed concurrency, a share of the clients hanging up mid-stream at random points.

Checks: every survivor's text and finish reason equal those of the same request sent alone; no 5xx
and no error event; after the load every KV block is free again; the server's resident memory is
flat after the warm-up.

The KV cache is made smaller than the load's peak demand (--num-gpu-blocks), so that requests get
preempted and recomputed under load, and so that the warm-up fills the whole cache: after it, KV
use adds no resident pages (the CPU cache is an anonymous mapping whose pages count once touched),
and RSS growth is heap growth. The bound on it (`rss_bound_mib`) is 32 MiB: the growth measured on
a healthy server stays under a few MiB at either scale (RELIABILITY.md), and a leak of a 49,152-
float row of logits (192 KiB) per request would pass it after ~170 requests.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .local_servers import LocalServer, local_api_server, metrics
from .reliability_common import (CHAT_PATH, COMPLETIONS_PATH, ScenarioResult, StreamRecord, finished_counts,
                                 greedy_body, http_client, kv_figures, progress_bar, solo_records, stream, wait_idle)
from .workloads import chat_prompts

MIB = 2**20


@dataclass(frozen=True)
class SoakSettings:
    requests: int = 200
    concurrency: int = 16
    hang_up_share: float = 0.2
    prompts: int = 8  # distinct prompts, each sent to both endpoints: 2x this many distinct requests
    max_tokens: Tuple[int, ...] = (8, 12, 16, 24)
    warmup_share: float = 0.2  # of the requests, and at least 2x the concurrency
    rss_bound_mib: float = 32.0
    kv_blocks: int = 24
    block_tokens: int = 16
    session_len: int = 512
    seed: int = 0
    idle_timeout_s: float = 10.0  # for every KV block to be free again once the last response ended


SCALES = {"ci": SoakSettings(),
          "full": SoakSettings(requests=1800, prompts=16, max_tokens=(8, 16, 32, 48, 64), kv_blocks=40)}

Key = Tuple[str, int]  # (endpoint path, prompt index)


@dataclass(frozen=True)
class Planned:
    key: Key
    hang_up_after: Optional[int]  # the client hangs up once it has more characters; None: it reads to the end


def distinct_requests(settings: SoakSettings) -> Dict[Key, Tuple[str, dict]]:
    """Every distinct request of the soak: each prompt to both endpoints, with lengths varied."""
    prompts = chat_prompts()[:settings.prompts]
    out = {}
    for i, prompt in enumerate(prompts):
        for j, path in enumerate((CHAT_PATH, COMPLETIONS_PATH)):
            max_tokens = settings.max_tokens[(2 * i + j) % len(settings.max_tokens)]
            out[(path, i)] = (path, greedy_body(path, prompt, max_tokens))
    return out


def plan(settings: SoakSettings, solo: Dict[Key, StreamRecord]) -> List[Planned]:
    """Requests in sending order: a random distinct request each; an exact share of them (among
    those whose answer has text) hang up at a random character of their answer, before its end."""
    rng = random.Random(settings.seed)
    keys = sorted(solo)
    chosen = [rng.choice(keys) for _ in range(settings.requests)]
    with_text = [i for i, key in enumerate(chosen) if solo[key].text]
    hang_ups = set(rng.sample(with_text, min(len(with_text), round(settings.requests * settings.hang_up_share))))
    return [Planned(key, rng.randrange(len(solo[key].text)) if i in hang_ups else None)
            for i, key in enumerate(chosen)]


class RssSampler(threading.Thread):
    """VmRSS of a process every `interval` seconds, as (seconds since start, bytes)."""

    def __init__(self, server: LocalServer, interval: float = 0.5):
        super().__init__(daemon=True)
        self.server, self.interval = server, interval
        self.samples: List[Tuple[float, int]] = []
        self._halt = threading.Event()
        self._start = time.monotonic()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.samples.append((round(time.monotonic() - self._start, 2), self.server.rss_bytes()))
            except (OSError, RuntimeError):  # the server has exited: the scenario reports why
                return

    def stop(self) -> None:
        self._halt.set()
        self.join()


async def _drive(url: str, requests: Dict[Key, Tuple[str, dict]], planned: List[Planned], concurrency: int,
                 bar) -> List[StreamRecord]:
    gate = asyncio.Semaphore(concurrency)
    async with http_client() as client:
        async def one(p: Planned) -> StreamRecord:
            async with gate:
                path, body = requests[p.key]
                record = await stream(client, url, path, body, hang_up_after=p.hang_up_after)
                bar.update(1)
                return record

        return list(await asyncio.gather(*(one(p) for p in planned)))


def _phase(result: ScenarioResult, server: LocalServer, requests, planned, settings, name: str, progress: bool):
    """Run one phase of the load; then wait for the server to be idle. Returns (records, rss after)."""
    with progress_bar(len(planned), f"soak {name}", progress) as bar:
        records = asyncio.run(_drive(server.url, requests, planned, settings.concurrency, bar))
    idle, m, waited = wait_idle(server.url, settings.idle_timeout_s)
    result.check(f"KV back to full after the {name}", idle,
                 f"{kv_figures(m)} {waited:.2f} s after the last response")
    return records, server.rss_bytes(), m


def _judge_answers(result: ScenarioResult, planned: List[Planned], records: List[StreamRecord],
                   solo: Dict[Key, StreamRecord]) -> None:
    survivors = [(p, r) for p, r in zip(planned, records) if p.hang_up_after is None]
    wrong = [(p, r) for p, r in survivors
             if not r.completed or (r.text, r.finish_reason) != (solo[p.key].text, solo[p.key].finish_reason)]
    first = ""
    if wrong:
        p, r = wrong[0]
        first = f"; first: {p.key} got {r.summary()} {r.text!r}, alone {solo[p.key].text!r}"
    result.check("survivors equal their solo greedy text", not wrong,
                 f"{len(survivors) - len(wrong)}/{len(survivors)} survivors equal{first}")
    leavers = [r for p, r in zip(planned, records) if p.hang_up_after is not None]
    result.check("clients hung up mid-stream as planned", all(r.status == 200 and r.hung_up for r in leavers),
                 f"{sum(r.hung_up for r in leavers)}/{len(leavers)} hung up after their response started")
    server_errors = [r for r in records if r.server_error or (r.status is not None and r.status != 200)]
    result.check("no 5xx, no error event, no refusal", not server_errors,
                 f"{len(server_errors)} of {len(records)}" + (f"; first: {server_errors[0].summary()}"
                                                              if server_errors else ""))


def _last_quarter_growth(samples: List[Tuple[float, int]]) -> Optional[float]:
    """RSS growth (MiB) over the last quarter of the run's duration: a cache that fills up levels
    off, a leak keeps its slope."""
    if len(samples) < 4:
        return None
    end = samples[-1][0]
    start = next(b for t, b in samples if t >= 0.75 * end)
    return round((samples[-1][1] - start) / MIB, 1)


def _judge_memory(result: ScenarioResult, settings: SoakSettings, preempted_in_warmup: float, rss_warm: int,
                  rss_end: int, main_requests: int) -> None:
    result.check("the warm-up filled the KV cache (a request was preempted)", preempted_in_warmup > 0,
                 f"{preempted_in_warmup:.0f} preemptions in the warm-up: every KV block was in use at least once")
    growth = rss_end - rss_warm
    result.check(f"RSS flat after the warm-up (growth <= {settings.rss_bound_mib:g} MiB)",
                 growth <= settings.rss_bound_mib * MIB,
                 f"{rss_warm / MIB:.1f} MiB after the warm-up, {rss_end / MIB:.1f} MiB at the end: "
                 f"{growth / MIB:+.1f} MiB over {main_requests} requests")


def run(settings: SoakSettings, workdir: Path, progress: bool = False, env: Optional[dict] = None) -> ScenarioResult:
    result = ScenarioResult("soak", asdict(settings))
    requests = distinct_requests(settings)
    with local_api_server("--session-len", str(settings.session_len), "--cache-block-seq-len",
                          str(settings.block_tokens), "--num-gpu-blocks", str(settings.kv_blocks),
                          log_path=workdir / "soak-server.log",
                          env=env) as server:
        solo = asyncio.run(solo_records(server.url, requests))
        planned = plan(settings, solo)
        num_warmup = min(len(planned), max(2 * settings.concurrency, round(len(planned) * settings.warmup_share)))
        before = metrics(server.url)
        sampler = RssSampler(server)
        sampler.start()
        started = time.monotonic()
        try:
            warm_records, rss_warm, after_warmup = _phase(result, server, requests, planned[:num_warmup], settings,
                                                          "warm-up", progress)
            main_records, rss_end, after = _phase(result, server, requests, planned[num_warmup:], settings,
                                                  "main phase", progress)
        finally:
            sampler.stop()
        seconds = time.monotonic() - started
    records = warm_records + main_records
    _judge_answers(result, planned, records, solo)
    server_side = {k: v - finished_counts(before)[k] for k, v in finished_counts(after).items()}
    result.check("no engine request failed", server_side["error"] == 0, f"server-side finish reasons {server_side}")
    _judge_memory(result, settings, after_warmup["tidemind_num_preemptions_total"]
                  - before["tidemind_num_preemptions_total"], rss_warm, rss_end, len(main_records))
    growth = rss_end - rss_warm
    result.figures = {
        "requests": len(records), "hung_up": sum(r.hung_up for r in records),
        "survivors": sum(p.hang_up_after is None for p in planned), "distinct_requests": len(requests),
        "warmup_requests": num_warmup, "seconds": round(seconds, 1),
        "requests_per_s": round(len(records) / seconds, 2),
        "server_finish_reasons": server_side,
        "preemptions": after["tidemind_num_preemptions_total"] - before["tidemind_num_preemptions_total"],
        "generated_tokens": after["tidemind_generation_tokens_total"] - before["tidemind_generation_tokens_total"],
        "rss_after_warmup_mib": round(rss_warm / MIB, 1), "rss_end_mib": round(rss_end / MIB, 1),
        "rss_peak_mib": round(max((b for _, b in sampler.samples), default=rss_end) / MIB, 1),
        "rss_growth_kib_per_request": round(growth / 1024 / max(len(main_records), 1), 2),
        "rss_growth_last_quarter_mib": _last_quarter_growth(sampler.samples),
        "rss_samples": [[t, round(b / MIB, 1)] for t, b in sampler.samples],
        "kv_after": kv_figures(after),
    }
    return result
