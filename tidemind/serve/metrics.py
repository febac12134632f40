"""Prometheus metrics of a server, in its own CollectorRegistry (GET /metrics).

Engine state (running / waiting requests, KV cache blocks, token counters) is read from
`Engine.stats()` when Prometheus scrapes, by a custom collector, so that it is never stale and
costs nothing between scrapes. Latencies and finish reasons are recorded per engine request by a
`RequestTimer` fed with the request's outputs (n > 1 choices are n engine requests).
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Iterator, Optional, Tuple

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..messages import FINISH_REASONS, RequestOutput

PREFIX = "tidemind_"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0, 160.0, 320.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                      0.75, 1.0, 2.5, 5.0)

# stats() key -> (metric name without prefix, help, kind)
_ENGINE_METRICS: Dict[str, Tuple[str, str, str]] = {
    "num_running": ("num_requests_running", "Requests in the engine's running batch.", "gauge"),
    "num_waiting": ("num_requests_waiting", "Requests queued for the engine.", "gauge"),
    "kv_usage": ("kv_cache_usage_ratio", "Share of KV cache blocks in use (0 to 1).", "gauge"),
    "kv_blocks_total": ("kv_cache_blocks_total", "KV cache blocks.", "gauge"),
    "kv_blocks_free": ("kv_cache_blocks_free", "KV cache blocks not in use.", "gauge"),
    "kv_blocks_in_idle_sessions": ("kv_cache_blocks_idle_sessions",
                                   "KV cache blocks kept by interactive sessions between turns.", "gauge"),
    "num_sessions": ("num_sessions", "Interactive sessions kept by the engine.", "gauge"),
    "num_preemptions": ("num_preemptions", "Requests preempted (recomputed later) for lack of KV blocks.",
                        "counter"),
    "prompt_tokens_total": ("prompt_tokens", "Prompt tokens of requests that produced a first token.", "counter"),
    "cached_prompt_tokens_total": ("cached_prompt_tokens",
                                   "Prompt tokens of session turns whose conversation KV was reused instead of "
                                   "computed (prefix-cache hits of all requests: prefix_cache_hits).",
                                   "counter"),
    "generated_tokens_total": ("generation_tokens", "Generated tokens.", "counter"),
    "prefix_cache_queries_total": ("prefix_cache_queries",
                                   "Tokens of admitted requests looked up for KV already in the cache.", "counter"),
    "prefix_cache_hits_total": ("prefix_cache_hits",
                                "Of those, tokens whose KV was found (prefix cache or a session's pinned blocks).",
                                "counter"),
    "prefix_cache_hit_rate": ("prefix_cache_hit_rate", "prefix_cache_hits / prefix_cache_queries since start.",
                              "gauge"),
    "kv_blocks_cached": ("kv_cache_blocks_cached", "KV blocks registered in the prefix cache, in use or not.",
                         "gauge"),
    "kv_blocks_evictable": ("kv_cache_blocks_evictable",
                            "Free KV blocks that still hold a cached prefix (counted as free).", "gauge"),
    "kv_blocks_evicted_total": ("kv_cache_blocks_evicted", "Cached KV blocks given up for new allocations.",
                                "counter"),
    "cpu_blocks_total": ("kv_cache_cpu_blocks_total", "Blocks of the host KV swap pool.", "gauge"),
    "cpu_blocks_free": ("kv_cache_cpu_blocks_free", "Free blocks of the host KV swap pool.", "gauge"),
    "swap_out_blocks_total": ("kv_swap_out_blocks", "KV blocks copied from the device to the host pool.",
                              "counter"),
    "swap_in_blocks_total": ("kv_swap_in_blocks", "KV blocks copied back from the host pool.", "counter"),
}


class _EngineCollector(Collector):
    def __init__(self, engine_stats: Callable[[], Dict[str, float]], in_flight: Callable[[], int]):
        self._engine_stats = engine_stats
        self._in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        stats = self._engine_stats()
        for key, (name, help_text, kind) in _ENGINE_METRICS.items():
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(PREFIX + name, help_text, value=float(stats[key]))
        yield GaugeMetricFamily(PREFIX + "http_requests_in_flight",
                                "Generation HTTP requests being answered (what --max-concurrent-requests bounds).",
                                value=float(self._in_flight()))


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], Dict[str, float]], in_flight: Callable[[], int]):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_stats, in_flight))
        self.finished = Counter(PREFIX + "requests", "Finished engine requests (one per choice) by finish reason.",
                                ["finish_reason"], registry=self.registry)
        for reason in FINISH_REASONS:
            self.finished.labels(reason)  # export zeros, so that rates work from the first scrape
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "From submission to the first token.",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds",
                              "Mean time between output tokens of one request, after the first.",
                              buckets=_PER_TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "From submission to the last output.",
                             buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.rejected = Counter(PREFIX + "http_requests_rejected",
                                "Generation HTTP requests refused with 429 (over --max-concurrent-requests).",
                                registry=self.registry)

    def timer(self) -> "RequestTimer":
        return RequestTimer(self)

    def render(self) -> Tuple[bytes, str]:
        """(body, content type) of a scrape."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Latencies of one engine request; started at submission, fed every output in order."""

    __slots__ = ("_metrics", "_start", "_first")

    def __init__(self, metrics: ServerMetrics):
        self._metrics = metrics
        self._start = time.perf_counter()
        self._first: Optional[float] = None

    def observe(self, out: RequestOutput) -> None:
        now = time.perf_counter()
        if self._first is None and out.new_token_ids:
            self._first = now
            self._metrics.ttft.observe(now - self._start)
        if not out.finished:
            return
        self._metrics.finished.labels(out.finish_reason or "error").inc()
        self._metrics.e2e.observe(now - self._start)
        if self._first is not None and out.num_generated_tokens > 1:
            self._metrics.tpot.observe((now - self._first) / (out.num_generated_tokens - 1))
