"""What every generating endpoint shares: building GenerationConfigs from request fields, submitting
engine requests, reading their outputs on the event loop, and giving up on a client that left.

Engine work happens in the engine's thread (AsyncEngine): the event loop only submits (validation
is cheap and raises ValueError for bad input) and awaits outputs, which the engine thread hands
over once per step for all of the loop's requests (`LoopSink`); a reader that fell behind gets
its request's queued deltas merged. Prompt rendering and tokenization run in worker threads.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable, Dict, List, Optional, Sequence, Tuple

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from ...config import GenerationConfig
from ...engine.async_engine import LoopSink
from ...messages import RequestOutput
from ..metrics import ServerMetrics
from .errors import ConcurrencyLimit, OpenAIError

logger = logging.getLogger("tidemind")

# JSON has no -inf: a token the model finds impossible is reported with this log-probability.
MIN_LOGPROB = -9999.0
_DISCONNECT_POLL_S = 0.25


def generation_config(*, max_tokens: Optional[int], default_max_tokens: int, temperature: Optional[float],
                      top_p: Optional[float], top_k: Optional[int], stop, logprobs: Optional[int] = None,
                      **extra) -> GenerationConfig:
    """A GenerationConfig from API fields (None: the field's API default). temperature 0 is greedy,
    top_k 0 or -1 keeps every token; `extra` holds GenerationConfig fields passed through as given.
    Seeds are not part of it: they go with each engine request (choice i of n gets seed + i)."""
    temperature = 1.0 if temperature is None else temperature
    passed = {k: v for k, v in extra.items() if v is not None}
    try:
        return GenerationConfig(
            max_new_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            do_sample=temperature > 0, temperature=temperature,
            top_p=1.0 if top_p is None else top_p, top_k=max(top_k or 0, 0),
            stop_words=[stop] if isinstance(stop, str) else stop, logprobs=logprobs, **passed)
    except ValueError as exc:  # bounds are checked by the protocol models first; this is a backstop
        raise OpenAIError(400, str(exc)) from None


@dataclass
class Sample:
    """One choice accumulated from its engine request's outputs."""

    text: str = ""
    token_ids: List[int] = field(default_factory=list)
    logprobs: List[Dict[int, float]] = field(default_factory=list)
    finish_reason: Optional[str] = None
    error: Optional[str] = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_cached_tokens: int = 0
    prompt_logprobs: Optional[list] = None  # with the first output, when GenerationConfig.prompt_logprobs is set

    def add(self, out: RequestOutput) -> None:
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.text += out.new_text
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.new_logprobs or ())
        self.num_prompt_tokens = out.num_prompt_tokens
        self.num_generated_tokens = out.num_generated_tokens
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        if out.finished:
            self.finish_reason, self.error = out.finish_reason, out.error


class RequestGroup:
    """Engine requests answered together (the n choices of the prompts of one HTTP request).

    Whoever owns a group aborts it when its HTTP request ends (`respond` does), which frees the
    KV blocks of requests nobody will read (a client that left, an error, a cancelled stream)."""

    def __init__(self, async_engine, metrics: ServerMetrics):
        self._engine = async_engine
        self._metrics = metrics
        self._loop = asyncio.get_running_loop()
        self._outputs: "asyncio.Queue[Tuple[int, RequestOutput]]" = asyncio.Queue()
        self.request_ids: List[int] = []
        self._unfinished: set = set()

    def __len__(self) -> int:
        return len(self.request_ids)

    def submit(self, prompt_ids: Sequence[int], config: GenerationConfig, seed: Optional[int] = None,
               session_id: Optional[int] = None) -> int:
        """Submit one engine request (ValueError: it cannot run); returns its index in the group."""
        index = len(self.request_ids)
        timer = self._metrics.timer()

        def receive(out: RequestOutput) -> None:  # runs in the event loop (LoopSink)
            # Timed when it arrives, not when the reader gets to it: the final output of a request
            # nobody reads any more (client gone) still counts, and a slow reader does not.
            timer.observe(out)
            self._outputs.put_nowait((index, out))

        self.request_ids.append(self._engine.submit(prompt_ids, config, LoopSink(self._loop, receive), seed,
                                                    session_id))
        self._unfinished.add(index)
        return index

    @property
    def done(self) -> bool:
        return not self._unfinished

    async def outputs(self) -> AsyncIterator[Tuple[int, RequestOutput]]:
        """(index, output) of every request until all have finished. Outputs that queued up while
        the reader was busy are merged per request (their deltas joined), so a reader that falls
        behind catches up with fewer, larger events instead of one per token."""
        while self._unfinished:
            batch = [await self._outputs.get()]
            while not self._outputs.empty():
                batch.append(self._outputs.get_nowait())
            for index, out in merge_outputs(batch):
                if out.finished:
                    self._unfinished.discard(index)
                yield index, out

    def abort(self) -> None:
        """Abort the unfinished requests; each still sends its final output (finish_reason "abort",
        or its real end if it finished meanwhile) to `outputs()`."""
        for index in sorted(self._unfinished):
            self._engine.abort(self.request_ids[index])


def merge_outputs(batch: List[Tuple[int, RequestOutput]]) -> List[Tuple[int, RequestOutput]]:
    """Join consecutive deltas of the same request index (order kept, first appearance first)."""
    merged: Dict[int, RequestOutput] = {}
    for index, out in batch:
        first = merged.get(index)
        if first is None:
            merged[index] = out
            continue
        merged[index] = dataclasses.replace(
            out, new_token_ids=first.new_token_ids + out.new_token_ids, new_text=first.new_text + out.new_text,
            new_logprobs=((first.new_logprobs or []) + (out.new_logprobs or [])
                          if first.new_logprobs is not None or out.new_logprobs is not None else None),
            num_cached_tokens=max(first.num_cached_tokens, out.num_cached_tokens),
            prompt_logprobs=first.prompt_logprobs if first.prompt_logprobs is not None else out.prompt_logprobs)
    return list(merged.items())


def submit_all(group: RequestGroup, validate: Callable, prompts: Sequence[Sequence[int]],
               configs: Sequence[GenerationConfig], n: int, seed: Optional[int], param: str) -> None:
    """Submit n samples of every prompt (group indices prompt * n + sample), seeds seed, seed+1, ...
    Everything is validated before anything is submitted: a bad prompt is a 400 with nothing queued."""
    try:
        for ids, config in zip(prompts, configs):
            validate(ids, config)
    except ValueError as exc:
        raise OpenAIError(400, str(exc), param=param) from None
    base_seed = seed if seed is not None else random.getrandbits(31)
    for ids, config in zip(prompts, configs):
        for sample in range(n):
            group.submit(ids, config, seed=base_seed + sample)


async def collect_samples(group: RequestGroup) -> List[Sample]:
    """Every request of the group, to its end; a failed one (engine error) makes the answer a 500."""
    samples = [Sample() for _ in range(len(group))]
    async for index, out in group.outputs():
        samples[index].add(out)
    failed = [s.error for s in samples if s.finish_reason == "error"]
    if failed:
        raise OpenAIError(500, f"generation failed: {failed[0]}")
    return samples


async def unless_disconnected(request: Request, work: Awaitable):
    """Await `work`; if the client disconnects first, cancel it (its RequestGroup aborts the engine
    requests) and return None."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=_DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                logger.info("client of %s left before the answer: aborted", request.url.path)
                return None
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that, however the stream ends (finished, client gone, server stopping),
    closes its generator and runs `on_close` (abort unfinished requests, free the in-flight slot)."""

    def __init__(self, content: AsyncIterator, on_close: Sequence[Callable[[], None]], media_type: str):
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = list(on_close)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                for callback in self._on_close:
                    callback()


async def respond(request: Request, limit: ConcurrencyLimit, group: RequestGroup, stream: bool,
                  make_stream: Callable[[], AsyncIterator[str]], media_type: str,
                  make_body: Callable[[], Awaitable[Response]], start: Callable[[], None],
                  on_close: Sequence[Callable[[], None]] = ()) -> Response:
    """Run a generating request under the in-flight limit: `start()` submits into `group`; then
    either stream `make_stream()` or await `make_body()` while watching for the client leaving.
    However it ends, the group's unfinished requests are aborted, the slot is freed, then
    `on_close` callbacks run."""
    slot = limit.acquire()
    closers = [group.abort, slot.release, *on_close]
    handed_over = False
    try:
        start()
        if stream:
            response = ClosingStreamingResponse(make_stream(), closers, media_type)
            handed_over = True
            return response
        body = await unless_disconnected(request, make_body())
        return body if body is not None else Response(status_code=499)
    finally:
        if not handed_over:
            for callback in closers:
                callback()


def token_text(tokenizer, token_id: int, cache: Dict[int, str]) -> str:
    """A token's own text, special tokens included (the cache holds at most the vocabulary)."""
    text = cache.get(token_id)
    if text is None:
        text = cache[token_id] = tokenizer.decode([token_id], skip_special_tokens=False)
    return text


def top_entries(entry: Dict[int, float], num_top: int) -> List[Tuple[int, float]]:
    """The num_top most likely of an engine logprobs entry (it holds the chosen token, which may be
    outside the top, and the top alternatives)."""
    return sorted(entry.items(), key=lambda kv: -kv[1])[:num_top]


def safe_logprob(value: float) -> float:
    return value if value > MIN_LOGPROB else MIN_LOGPROB
