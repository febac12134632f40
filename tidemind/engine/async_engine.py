"""Drives an Engine from one background thread; callers in other threads (or an asyncio loop)
submit requests and receive their outputs.

EngineFront is the callers' side (request ids, sinks, session turns, handing outputs over, dying
loudly); AsyncEngine puts the Engine behind it in a thread of this process, and
engine_client.EngineProcessClient puts it in a process of its own (the api_server's choice on a
GPU: the engine's host work and the HTTP layer then never wait for one GIL).

Only the engine thread touches the Engine's mutable state: callers hand it commands through an
inbox. Validation runs in the caller's thread, so a bad request raises there and never reaches
the engine.

The engine contains the failures of single requests and single steps itself (engine.py). If the
engine thread cannot go on (an exception outside that containment, e.g. while recovering from a
failed step), the AsyncEngine is dead: `failure` says why, every caller waiting on a request gets a
final error output at once, new submissions raise EngineDeadError, and the on_failure callbacks run
(the server uses one to report unhealthy and exit), never a silent hang. An executor that dies
while the engine thread idles (a tensor-parallel rank's process ended) wakes the thread, which dies
the same way.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import weakref
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Deque, Dict, Iterator, List, Optional, Sequence, Union

from ..config import GenerationConfig
from ..messages import RequestOutput
from .engine import Engine
from .executor import ExecutorDeadError

logger = logging.getLogger("tidemind")

Sink = Callable[[RequestOutput], None]


class LoopChannel:
    """Hands outputs over to one asyncio event loop: the engine thread hands a step's outputs for
    every sink of the loop over in a single call_soon_threadsafe (one wake-up per step, not one
    per token)."""

    _of_loop: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopChannel]" = weakref.WeakKeyDictionary()
    _lock = threading.Lock()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> "LoopChannel":
        with cls._lock:
            channel = cls._of_loop.get(loop)
            if channel is None:
                channel = cls._of_loop[loop] = cls(loop)
            return channel

    def deliver(self, items) -> None:
        """items: [(sink, output)]; RuntimeError when the loop is closed (its callers are gone)."""
        self.loop.call_soon_threadsafe(_deliver, items)


class LoopSink:
    """A sink whose outputs are handled in an asyncio event loop: `callback(output)` runs in that
    loop. A sink with a `channel` gets its outputs through channel.deliver([(sink, output), ...]),
    once per step for all the sinks of that channel."""

    __slots__ = ("channel", "callback")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Sink):
        self.channel = LoopChannel.of(loop)
        self.callback = callback

    def __call__(self, out: RequestOutput) -> None:  # a lone output, outside a step's dispatch
        self.channel.loop.call_soon_threadsafe(self.callback, out)


def _deliver(items) -> None:
    """Runs in an event loop: hand each (sink, output) over, in order."""
    for sink, out in items:
        sink.callback(out)


class EngineDeadError(RuntimeError):
    """The engine thread stopped after an unrecoverable failure; no request can run."""


# Commands callers put in the engine thread's inbox; it applies them in order before each step.
@dataclass(frozen=True)
class AddRequest:
    request_id: int
    prompt_token_ids: List[int]
    gen_config: GenerationConfig
    seed: Optional[int]
    session_id: Optional[int]


@dataclass(frozen=True)
class AbortRequest:
    request_id: int


@dataclass(frozen=True)
class EndSession:
    session_id: int


Command = Union[AddRequest, AbortRequest, EndSession]


class EngineFront(ABC):
    """The callers' side of an engine that runs elsewhere: request ids, each request's sink, the
    session turns in flight, and the hand-over of outputs. A subclass carries the commands to the
    engine (`_send`, called with self._wake held, in the order callers made them) and hands the
    engine's outputs to `_dispatch`; `_die` ends everything when the engine cannot go on.

    `engine` answers validate_request (an Engine, or engine_client.RemoteEngine)."""

    def __init__(self, engine):
        self.engine = engine
        self._ids = itertools.count(1)
        self._sinks: Dict[int, Sink] = {}
        # session_id -> the request running its turn, as callers see it: an abort or end_session
        # releases the session at once, since the engine applies commands in order.
        self._session_turns: Dict[int, int] = {}
        self._wake = threading.Condition()
        self._closed = False
        self.failure: Optional[str] = None  # set once the engine died; then nothing runs
        self.on_failure: List[Callable[[str], None]] = []

    @abstractmethod
    def _send(self, command: Command) -> None:
        """Carry a command to the engine (self._wake is held)."""

    @abstractmethod
    def _forget(self, request_id: int) -> None:
        """Abort a request whose output could not be delivered (called where _dispatch runs)."""

    # ------------------------------------------------------------ callers' side
    def submit(self, prompt_token_ids: Sequence[int], gen_config: GenerationConfig, sink: Sink,
               seed: Optional[int] = None, session_id: Optional[int] = None,
               request_id: Optional[int] = None) -> int:
        """Queue a request; its outputs go to `sink` from the engine thread. Returns its id (the one
        given, when the caller numbers its requests itself). With `session_id` the request is the
        next turn of that conversation (see Engine.add_request)."""
        if self._closed:
            raise RuntimeError("the engine is closed")
        self.engine.validate_request(prompt_token_ids, gen_config, session_id)
        request_id = next(self._ids) if request_id is None else request_id
        with self._wake:
            if self.failure is not None:
                raise EngineDeadError(f"the engine stopped after a failure ({self.failure}); restart it")
            if session_id is not None:
                if session_id in self._session_turns:
                    raise ValueError(f"session {session_id} is busy with another request: wait for it to "
                                     f"finish, or cancel it, before the next turn")
                self._session_turns[session_id] = request_id
            self._sinks[request_id] = sink
            self._send(AddRequest(request_id, list(prompt_token_ids), gen_config, seed, session_id))
        return request_id

    def end_session(self, session_id: int) -> None:
        """Forget a conversation and free its KV (a running turn is aborted)."""
        with self._wake:
            self._session_turns.pop(session_id, None)
            self._send(EndSession(session_id))

    def abort(self, request_id: int) -> None:
        with self._wake:
            self._release_session_of(request_id)
            self._send(AbortRequest(request_id))

    def stream(self, prompt_token_ids: Sequence[int], gen_config: GenerationConfig,
               seed: Optional[int] = None, session_id: Optional[int] = None) -> Iterator[RequestOutput]:
        """Submit now (a bad request raises here) and return a blocking iterator over the request's
        outputs; closing the iterator early aborts the request."""
        outputs: "queue.SimpleQueue[RequestOutput]" = queue.SimpleQueue()
        request_id = self.submit(prompt_token_ids, gen_config, outputs.put, seed, session_id)
        return self._drain(request_id, outputs)

    def _drain(self, request_id: int, outputs: "queue.SimpleQueue[RequestOutput]") -> Iterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                out = outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    async def generate(self, prompt_token_ids: Sequence[int], gen_config: GenerationConfig,
                       seed: Optional[int] = None, session_id: Optional[int] = None
                       ) -> AsyncIterator[RequestOutput]:
        """Async iterator over one request's outputs; cancelling the consumer aborts the request."""
        loop = asyncio.get_running_loop()
        outputs: "asyncio.Queue[RequestOutput]" = asyncio.Queue()
        request_id = self.submit(prompt_token_ids, gen_config, LoopSink(loop, outputs.put_nowait), seed, session_id)
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.abort(request_id)

    # ------------------------------------------------------------ the engine's side
    def _die(self, reason: str) -> None:
        """The engine cannot go on: every waiting caller gets a final error output now, then the
        on_failure callbacks run."""
        with self._wake:
            if self.failure is not None:
                return
            self.failure = reason
            sinks, self._sinks = self._sinks, {}
            self._session_turns.clear()
            self._forget_commands()
        error = f"the engine stopped after a failure ({reason})"
        for request_id, sink in sinks.items():
            try:
                sink(RequestOutput(request_id, [], "", 0, 0, finished=True, finish_reason="error", error=error))
            except Exception:
                logger.exception("could not deliver the failure of request %d", request_id)
        for callback in list(self.on_failure):
            try:
                callback(reason)
            except Exception:
                logger.exception("an on_failure callback failed")

    def _forget_commands(self) -> None:
        """Drop commands not yet carried to the engine (self._wake is held; the engine is dead)."""

    def _release_session_of(self, request_id: int) -> None:
        # Call with self._wake held.
        for session_id, turn in list(self._session_turns.items()):
            if turn == request_id:
                del self._session_turns[session_id]

    def _dispatch(self, outputs) -> None:
        """Hand outputs to their sinks: those with a channel once per channel, the others one by one."""
        by_channel: Dict[object, list] = {}
        for out in outputs:
            if out.finished and self._session_turns:
                with self._wake:
                    self._release_session_of(out.request_id)
            sink = self._sinks.pop(out.request_id, None) if out.finished else self._sinks.get(out.request_id)
            if sink is None:
                continue
            channel = getattr(sink, "channel", None)
            if channel is not None:
                by_channel.setdefault(channel, []).append((sink, out))
                continue
            try:
                sink(out)
            except Exception:  # a caller that went away must not stop the engine
                self._undeliverable(out)
        for channel, items in by_channel.items():
            try:
                channel.deliver(items)
            except RuntimeError:  # the loop is closed: its callers are gone
                for _, out in items:
                    self._undeliverable(out)

    def _undeliverable(self, out: RequestOutput) -> None:
        logger.exception("the output of request %d could not be delivered; aborting it", out.request_id)
        if not out.finished:
            self._sinks.pop(out.request_id, None)
            self._forget(out.request_id)


class AsyncEngine(EngineFront):
    """The Engine in a thread of this process: commands go through an inbox the thread empties
    before each step."""

    def __init__(self, engine: Engine):
        super().__init__(engine)
        self._inbox: Deque[Command] = deque()
        self._executor_failure: Optional[str] = None  # the executor died on its own (engine thread wakes)
        engine.executor.add_failure_listener(self._executor_failed)
        self._thread = threading.Thread(target=self._run, name="tidemind-engine", daemon=True)
        self._thread.start()

    def _send(self, command: Command) -> None:
        self._inbox.append(command)
        self._wake.notify()

    def _forget(self, request_id: int) -> None:  # in the engine thread
        self.engine.abort_request(request_id)

    def _forget_commands(self) -> None:
        self._inbox.clear()

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()
        self.engine.close()

    @property
    def is_alive(self) -> bool:
        return self.failure is None and self._thread.is_alive()

    # ------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the engine cannot go on: fail everyone now, never hang
            logger.critical("the engine thread died", exc_info=True)
            self._die(str(exc) if isinstance(exc, ExecutorDeadError) else f"{type(exc).__name__} in the engine thread")

    def _executor_failed(self, reason: str) -> None:  # called in the executor's thread
        with self._wake:
            self._executor_failure = reason
            self._wake.notify()

    def _loop(self) -> None:
        while True:
            with self._wake:
                while (not self._closed and not self._inbox and not self.engine.has_unfinished_requests()
                       and self._executor_failure is None):
                    self._wake.wait()
                if self._executor_failure is not None and not self._closed:
                    raise ExecutorDeadError(self._executor_failure)
                if self._closed:
                    self.engine.abort_all("the engine was closed")
                    self._dispatch(self.engine.step())
                    return
                commands = list(self._inbox)
                self._inbox.clear()
            for command in commands:
                self._apply(command)
            self._dispatch(self.engine.step())

    def _apply(self, command: Command) -> None:
        if isinstance(command, AbortRequest):
            self.engine.abort_request(command.request_id)
        elif isinstance(command, EndSession):
            self.engine.end_session(command.session_id)
        else:
            try:
                self.engine.add_request(command.request_id, command.prompt_token_ids, command.gen_config,
                                        command.seed, command.session_id)
            except Exception as exc:
                logger.exception("request %d could not be added", command.request_id)
                self._dispatch([RequestOutput(command.request_id, [], "", len(command.prompt_token_ids), 0,
                                              finished=True, finish_reason="error", error=str(exc))])
