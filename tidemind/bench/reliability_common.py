"""What the scenarios of `tidemind bench reliability` share: verdicts (checks and figures), a
streaming client that can hang up on purpose, greedy request bodies, solo reference texts, and the
wait for a server to be idle with every KV block free again."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Hashable, List, Mapping, Optional, Tuple

import httpx

from .local_servers import metrics
from .serve_client import SSEParser, chunk_fields

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"


# ---------------------------------------------------------------------- verdicts
@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class ScenarioResult:
    """One scenario's verdict: it passes when it ran to its end and every check held."""

    name: str
    settings: Dict[str, Any]
    checks: List[Check] = field(default_factory=list)
    figures: Dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: Optional[str] = None  # why the scenario could not run to its end

    @property
    def passed(self) -> bool:
        return self.error is None and bool(self.checks) and all(c.passed for c in self.checks)

    def check(self, name: str, passed: bool, detail: str) -> bool:
        self.checks.append(Check(name, bool(passed), detail))
        return bool(passed)

    def failed_checks(self) -> List[str]:
        return [c.name for c in self.checks if not c.passed]

    def as_dict(self) -> dict:
        return {"name": self.name, "passed": self.passed, "seconds": round(self.seconds, 1), "error": self.error,
                "settings": self.settings, "figures": self.figures, "checks": [asdict(c) for c in self.checks]}


# ---------------------------------------------------------------------- requests
def greedy_body(path: str, prompt: str, max_tokens: int, stream: bool = True, **extra) -> dict:
    """A greedy chat (the prompt as one user message) or completions (the prompt as is) body."""
    what = {"messages": [{"role": "user", "content": prompt}]} if path == CHAT_PATH else {"prompt": prompt}
    return {**what, "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}


def http_client(timeout: float = 120.0) -> httpx.AsyncClient:
    # trust_env=False: loopback servers are reached directly, never through the shell's HTTP proxy.
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10.0), trust_env=False,
                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=256))


@dataclass
class StreamRecord:
    """What a client saw of one streamed request."""

    status: Optional[int] = None
    text: str = ""
    content_chunks: int = 0
    finish_reason: Optional[str] = None
    done: bool = False  # the stream ended with data: [DONE]
    error_event: Optional[dict] = None  # a data: {"error": {...}} event
    transport_error: Optional[str] = None  # the connection broke or timed out
    hung_up: bool = False  # the client closed the stream on purpose
    error_body: Optional[dict] = None  # the body of a non-200 answer
    headers: Dict[str, str] = field(default_factory=dict)
    sent_s: float = 0.0
    ended_s: float = 0.0

    @property
    def completed(self) -> bool:
        return (self.status == 200 and self.done and self.error_event is None and self.transport_error is None
                and not self.hung_up)

    @property
    def server_error(self) -> bool:
        """A 5xx answer or an error event in a stream."""
        return (self.status is not None and self.status >= 500) or self.error_event is not None

    @property
    def error_code(self) -> Optional[str]:
        error = (self.error_event or self.error_body or {}).get("error")
        return error.get("code") if isinstance(error, dict) else None

    def summary(self) -> str:
        if self.completed:
            return f"200, {self.content_chunks} chunks, {self.finish_reason}"
        parts = [f"status {self.status}"]
        if self.error_event is not None or self.error_body is not None:
            parts.append(json.dumps(self.error_event or self.error_body)[:200])
        if self.transport_error:
            parts.append(self.transport_error)
        if self.status == 200 and not self.done and not self.hung_up:
            parts.append("no [DONE]")
        return ", ".join(parts)


async def stream(client: httpx.AsyncClient, url: str, path: str, body: dict,
                 hang_up_after: Optional[int] = None, timeout: Optional[float] = None) -> StreamRecord:
    """POST a streamed request; with `hang_up_after` = c the client closes the connection once more
    than c characters of text have come (counted in characters, not events: a server may join the
    deltas of a reader that fell behind into one event)."""
    record = StreamRecord(sent_s=time.monotonic())
    parser = SSEParser()
    kwargs = {} if timeout is None else {"timeout": timeout}
    try:
        async with client.stream("POST", f"{url}{path}", json=body, **kwargs) as response:
            record.status = response.status_code
            record.headers = dict(response.headers)
            if response.status_code != 200:
                record.error_body = _json_or_text(await response.aread())
                return record
            async for line in response.aiter_lines():
                data = parser.feed(line)
                if data is not None and _stream_event(record, data) and hang_up_after is not None \
                        and len(record.text) > hang_up_after:
                    record.hung_up = True
                    return record
            data = parser.flush()
            if data is not None:
                _stream_event(record, data)
    except httpx.TimeoutException as exc:
        record.transport_error = f"timed out ({type(exc).__name__})"
    except httpx.HTTPError as exc:
        record.transport_error = f"{type(exc).__name__}: {exc or 'connection lost'}"
    except (ValueError, AttributeError) as exc:  # an event that is not an OpenAI chunk
        record.transport_error = f"unreadable stream event ({type(exc).__name__}: {exc})"
    finally:
        record.ended_s = time.monotonic()
    return record


def _stream_event(record: StreamRecord, data: str) -> bool:
    """Fold one SSE event into the record; True if it carried content text."""
    if data.strip() == "[DONE]":
        record.done = True
        return False
    chunk = json.loads(data)
    if "error" in chunk and not chunk.get("choices"):
        record.error_event = chunk
        return False
    text, finish, _, _ = chunk_fields(chunk)
    record.text += text
    if finish:
        record.finish_reason = finish
    if text:
        record.content_chunks += 1
    return bool(text)


def _json_or_text(content: bytes) -> dict:
    try:
        value = json.loads(content)
        return value if isinstance(value, dict) else {"body": value}
    except ValueError:
        return {"body": content.decode("utf-8", "replace")[:500]}


async def solo_records(url: str, requests: Mapping[Hashable, Tuple[str, dict]],
                       timeout: float = 300.0) -> Dict[Hashable, StreamRecord]:
    """Each request (key -> (path, body)) sent alone, one after the other: the reference texts."""
    out = {}
    async with http_client(timeout) as client:
        for key, (path, body) in requests.items():
            record = await stream(client, url, path, body)
            if not record.completed:
                raise RuntimeError(f"the solo request {key!r} failed: {record.summary()}")
            out[key] = record
    return out


def progress_bar(total: int, desc: str, enabled: bool):
    """A tqdm bar on stderr (a do-nothing one when not `enabled`); use it as a context manager."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


# ---------------------------------------------------------------------- server state
def kv_idle(m: Mapping[str, float]) -> bool:
    """Nothing runs, waits or is in flight, and every KV block is free (but those interactive
    sessions keep between turns; blocks that only hold a cached prefix count as free), in the
    device cache and in the host swap pool alike (sessions may keep blocks there too)."""
    host_pool_free = (m.get("tidemind_kv_cache_cpu_blocks_free", 0) == m.get("tidemind_kv_cache_cpu_blocks_total", 0)
                      or m.get("tidemind_num_sessions", 0) > 0)
    return (m["tidemind_http_requests_in_flight"] == 0 and m["tidemind_num_requests_running"] == 0
            and m["tidemind_num_requests_waiting"] == 0 and host_pool_free
            and m["tidemind_kv_cache_blocks_free"] + m["tidemind_kv_cache_blocks_idle_sessions"]
            == m["tidemind_kv_cache_blocks_total"])


def wait_idle(url: str, timeout: float = 15.0) -> Tuple[bool, Dict[str, float], float]:
    """(idle, the last /metrics, seconds waited): polls until kv_idle or `timeout`."""
    start = time.monotonic()
    while True:
        m = metrics(url)
        waited = time.monotonic() - start
        if kv_idle(m) or waited > timeout:
            return kv_idle(m), m, waited
        time.sleep(0.05)


def kv_figures(m: Mapping[str, float]) -> Dict[str, float]:
    return {"kv_blocks_free": m["tidemind_kv_cache_blocks_free"],
            "kv_blocks_total": m["tidemind_kv_cache_blocks_total"],
            "in_flight": m["tidemind_http_requests_in_flight"], "running": m["tidemind_num_requests_running"],
            "waiting": m["tidemind_num_requests_waiting"],
            "host_blocks_free": m.get("tidemind_kv_cache_cpu_blocks_free", 0),
            "host_blocks_total": m.get("tidemind_kv_cache_cpu_blocks_total", 0)}


def finished_counts(m: Mapping[str, float]) -> Dict[str, int]:
    """Engine requests finished per finish reason (tidemind_requests_total)."""
    return {reason: int(m.get(f"tidemind_requests_total{{finish_reason={reason}}}", 0))
            for reason in ("stop", "length", "abort", "error")}


def answers_normally(url: str, headers: Optional[Dict[str, str]] = None, timeout: float = 60.0) -> Tuple[bool, str]:
    """A short greedy chat request answers 200 with text; (ok, what came back)."""
    try:
        response = httpx.post(f"{url}{CHAT_PATH}", json=greedy_body(CHAT_PATH, "Say hello.", 1, stream=False),
                              headers=headers, timeout=timeout, trust_env=False)
    except httpx.HTTPError as exc:
        return False, f"{type(exc).__name__}: {exc}"
    ok = response.status_code == 200 and bool(response.json()["choices"][0]["message"]["content"])
    return ok, f"{response.status_code} {response.text[:200]}"
