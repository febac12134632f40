"""A streaming client for any OpenAI-compatible server, built to time chunks, not to be convenient.

httpx.AsyncClient with the SSE parsed here (the openai client hides when each chunk arrived).
Every failure becomes `RequestRecord.error` (one line naming the cause); nothing is dropped.
"""
from __future__ import annotations

import json
import time
from typing import Dict, List, Optional

import httpx

from .serve_metrics import RequestRecord


def normalize_url(url: str) -> str:
    """The server root: 'http://h:p/v1/' -> 'http://h:p' (endpoints are appended as '/v1/...')."""
    url = url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--url {url!r} is not an http(s) URL; pass e.g. http://127.0.0.1:23333")
    return url[:-3] if url.endswith("/v1") else url


def auth_headers(api_key: Optional[str]) -> Dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class SSEParser:
    """Server-sent events, line by line: `feed(line)` returns an event's data when a blank line
    ends it (several `data:` lines join with newlines); comments and other fields are skipped."""

    def __init__(self) -> None:
        self._data: List[str] = []

    def feed(self, line: str) -> Optional[str]:
        line = line.rstrip("\r\n")
        if not line:
            return self.flush()
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def flush(self) -> Optional[str]:
        """The pending event's data (a stream may end without the final blank line)."""
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def chunk_fields(chunk: dict) -> tuple:
    """(content text, finish_reason, usage's completion_tokens, usage's prompt_tokens) of one
    streamed chunk (None for what it lacks) of /v1/completions (choices[0].text) or /v1/chat/completions (delta.content)."""
    text, finish = "", None
    choices = chunk.get("choices") or []
    if choices:
        choice = choices[0]
        delta = choice.get("delta")
        if delta is not None:
            text = (delta.get("content") or "") + (delta.get("reasoning_content") or "")
        else:
            text = choice.get("text") or ""
        finish = choice.get("finish_reason")
    usage = chunk.get("usage") or {}
    return text, finish, usage.get("completion_tokens"), usage.get("prompt_tokens")


def _error_text(response_body: bytes, status: int) -> str:
    body = response_body.decode("utf-8", "replace").strip().replace("\n", " ")
    try:
        parsed = json.loads(body)
        err = parsed.get("error", parsed)
        body = (err.get("message") or err.get("detail") or body) if isinstance(err, dict) else str(err)
    except (ValueError, AttributeError):
        pass
    hint = " (pass the server's key with --api-key)" if status in (401, 403) else ""
    return f"HTTP {status}{hint}: {str(body)[:300]}"


class _StreamState:
    """Folds one response's SSE events into a RequestRecord.

    Tokens per content chunk: when every content chunk carries cumulative usage (vLLM's
    continuous_usage_stats), the difference between consecutive counts; otherwise 1."""

    def __init__(self, record: RequestRecord) -> None:
        self.record = record
        self.done = False
        self._usage_per_chunk = True
        self._last_usage = 0

    def event(self, data: str, now: float) -> None:
        if data.strip() == "[DONE]":
            self.done = True
            return
        chunk = json.loads(data)
        if "error" in chunk and not chunk.get("choices"):
            err = chunk["error"]
            message = err.get("message", err) if isinstance(err, dict) else err
            raise _ServerStreamError(f"server error in stream: {message}")
        text, finish, completion_tokens, prompt_tokens = chunk_fields(chunk)
        record = self.record
        if text:
            if completion_tokens is None:
                self._usage_per_chunk = False
            n = 1
            if self._usage_per_chunk and completion_tokens is not None:
                n = max(completion_tokens - self._last_usage, 1)
            record.chunks.append((now, n))
        if completion_tokens is not None:
            self._last_usage = completion_tokens
            record.usage_output_tokens = completion_tokens
        if prompt_tokens is not None:
            record.usage_prompt_tokens = prompt_tokens
        if finish:
            record.finish_reason = finish


class _ServerStreamError(Exception):
    pass


async def stream_request(client: httpx.AsyncClient, url: str, body: dict, headers: Dict[str, str],
                         record: RequestRecord, timeout_s: float) -> RequestRecord:
    """POST `body` (which asks for stream=True) and time its chunks into `record`."""
    state = _StreamState(record)
    parser = SSEParser()
    record.sent_s = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body, headers=headers, timeout=timeout_s) as response:
            if response.status_code != 200:
                record.error = _error_text(await response.aread(), response.status_code)
                return record
            async for line in response.aiter_lines():
                data = parser.feed(line)
                if data is not None:
                    state.event(data, time.perf_counter())
            data = parser.flush()
            if data is not None:
                state.event(data, time.perf_counter())
        if not state.done and record.finish_reason is None:
            record.error = "the response stream ended without a finish_reason or [DONE]"
    except _ServerStreamError as exc:
        record.error = str(exc)
    except httpx.TimeoutException as exc:
        record.error = f"timed out after {timeout_s:g}s ({type(exc).__name__}; raise --timeout)"
    except httpx.HTTPError as exc:
        record.error = f"{type(exc).__name__}: {exc or 'connection lost'}"
    except (ValueError, KeyError, AttributeError, TypeError) as exc:
        record.error = f"unreadable stream chunk ({type(exc).__name__}: {exc})"
    finally:
        record.end_s = time.perf_counter()
    return record


async def served_models(client: httpx.AsyncClient, base_url: str, headers: Dict[str, str]) -> List[str]:
    """GET /v1/models; user errors (nothing listening, a key needed, not an OpenAI server) raise
    RuntimeError naming the fix."""
    try:
        response = await client.get(f"{base_url}/v1/models", headers=headers, timeout=30.0)
    except httpx.ConnectError as exc:
        raise RuntimeError(f"cannot reach a server at {base_url} ({exc}); start one first (e.g. "
                           f"`tidemind serve api_server --server-port 23333`) or fix --url") from None
    except httpx.HTTPError as exc:
        raise RuntimeError(f"GET {base_url}/v1/models failed ({type(exc).__name__}: {exc}); check --url") from None
    if response.status_code in (401, 403):
        raise RuntimeError(f"the server at {base_url} refused the request (HTTP {response.status_code}); "
                           f"pass its API key with --api-key KEY")
    if response.status_code != 200:
        raise RuntimeError(f"GET {base_url}/v1/models answered HTTP {response.status_code}; --url must be "
                           f"the root of an OpenAI-compatible server, e.g. http://127.0.0.1:23333")
    try:
        return [m["id"] for m in response.json().get("data", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise RuntimeError(f"GET {base_url}/v1/models did not return an OpenAI model list; check --url") from None


def choose_model(served: List[str], wanted: Optional[str], base_url: str) -> str:
    if wanted is None:
        if not served:
            raise RuntimeError(f"the server at {base_url} lists no models; pass one with --model NAME")
        return served[0]
    if served and wanted not in served:
        raise ValueError(f"model {wanted!r} is not served at {base_url}; it serves {served}: "
                         f"pass one of them with --model (or leave --model out to use the first)")
    return wanted
