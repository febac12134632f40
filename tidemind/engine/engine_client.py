"""The caller's side of an engine in a process of its own (engine_process.py).

Why: a step of a large batch takes milliseconds of Python on the host (scheduling, inputs,
detokenizing), and so does streaming its tokens over HTTP. In one process they take turns on one
GIL, so every chunk the server sends delays the next step; apart, each has its own. The api_server
runs its engine this way on a GPU (`--engine-process`); pipeline(engine_process=True) does too.

EngineProcessClient is an EngineFront (async_engine.py): callers submit, abort and end sessions as
with an AsyncEngine, and their sinks get the same outputs in the same order. Threads:
    callers         validate against RemoteEngine (the engine's limits, its sessions' lengths),
                    register the sink, queue the command
    sender          sends queued commands in order (callers never block on the socket)
    receiver        reads a step's outputs and hands them to the sinks (channels once per step),
                    stats answers, and the engine's failure
The engine process dying (killed, crashed, or its engine failed) makes the client dead as an
AsyncEngine whose thread died: every waiting caller gets an error output, on_failure runs.
"""
from __future__ import annotations

import logging
import pickle
import queue
import socket
import subprocess
import sys
import threading
from collections import deque
from multiprocessing.connection import Connection
from typing import Deque, Dict, Optional, Sequence

from ..config import EngineConfig, GenerationConfig
from .async_engine import AbortRequest, Command, EndSession, EngineDeadError, EngineFront
from .engine import check_request, load_tokenizer
from .engine_process import EngineSummary, send, unpack_output
from .mp_executor import exit_text, worker_env

logger = logging.getLogger("tidemind")

_STATS_TIMEOUT_S = 10.0
_CLOSE_TIMEOUT_S = 60.0  # for the engine to abort what runs and stop its device work
_EXIT_TIMEOUT_S = 10.0


class RemoteEngine:
    """What this process knows of the Engine in the engine process: the model, its limits, the KV
    cache, the tokenizer (loaded here too: prompts are encoded where requests arrive), and the
    length of each session, kept from the engine's outputs."""

    def __init__(self, summary: EngineSummary, tokenizer, client: "EngineProcessClient"):
        self.resolved = summary.resolved
        self.model_config = summary.model_config
        self.config = summary.config
        self.session_len = summary.session_len
        self.max_total_tokens = summary.max_total_tokens
        self.max_batch_size = summary.max_batch_size
        self.kv_spec = summary.kv_spec
        self.description = summary.description
        self.tokenizer = tokenizer
        self._client = client
        self._session_tokens: Dict[int, int] = {}

    def validate_request(self, prompt_token_ids: Sequence[int], gen_config: GenerationConfig,
                         session_id: Optional[int] = None) -> None:
        history = self._session_tokens.get(session_id, 0) if session_id is not None else 0
        check_request(prompt_token_ids, gen_config, self.model_config.vocab_size, self.max_total_tokens,
                      self.session_len, session_id, history)

    def stats(self) -> Dict[str, float]:
        return self._client.request_stats()

    def note_sessions(self, lengths: Dict[int, int]) -> None:
        self._session_tokens.update(lengths)

    def forget_session(self, session_id: int) -> None:
        self._session_tokens.pop(session_id, None)


class EngineProcessClient(EngineFront):
    def __init__(self, model: Optional[str], config: EngineConfig):
        ours, theirs = socket.socketpair()
        with theirs:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "tidemind.engine.engine_process", "--fd", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),), env=worker_env())
        self._conn = Connection(ours.detach())
        send(self._conn, (model, config, logging.getLogger("tidemind").getEffectiveLevel()))
        # the tokenizer's libraries import (seconds on a fresh machine) while the engine loads
        threading.Thread(target=_import_tokenizer_libraries, name="tidemind-tokenizer-import", daemon=True).start()
        summary = self._wait_ready()
        try:
            tokenizer = load_tokenizer(summary.resolved.path, "for the engine process's requests")
        except BaseException:
            self._conn.close()  # the engine process sees its client gone and stops
            self._proc.wait(_CLOSE_TIMEOUT_S)
            raise
        super().__init__(RemoteEngine(summary, tokenizer, self))
        self._outbox: Deque[object] = deque()
        self._stopping = False  # the sender's end, after close
        self._stats_lock = threading.Lock()
        self._stats: "queue.SimpleQueue[dict]" = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="tidemind-engine-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="tidemind-engine-receive", daemon=True)
        self._sender.start()
        self._receiver.start()
        logger.info("engine process %d ready: %s", self._proc.pid, summary.description)

    def _wait_ready(self) -> EngineSummary:
        """The engine's summary once it has started; its start-up error raised here, named."""
        while not self._conn.poll(0.5):
            if self._proc.poll() is not None:
                self._conn.close()
                raise RuntimeError(f"the engine process {_process_exit_text(self._proc.returncode)} while starting; "
                                   f"its log above says why")
        try:
            message = pickle.loads(self._conn.recv_bytes())
        except (EOFError, OSError):
            self._proc.wait(_EXIT_TIMEOUT_S)
            self._conn.close()
            raise RuntimeError(f"the engine process {_process_exit_text(self._proc.returncode)} while starting") from None
        if message[0] == "start_failed":
            self._proc.wait(_EXIT_TIMEOUT_S)
            self._conn.close()
            _, blob, kind, text = message
            # the engine's own error, as starting it in this process would have raised it
            raise (pickle.loads(blob) if blob is not None else RuntimeError(f"{kind}: {text}"))
        return message[1]

    # ---- EngineFront ------------------------------------------------------------------------------
    def _send(self, command: Command) -> None:
        if isinstance(command, EndSession):
            self.engine.forget_session(command.session_id)
        self._outbox.append(command)
        self._wake.notify_all()

    def _forget(self, request_id: int) -> None:  # in the receiver thread
        with self._wake:
            self._send(AbortRequest(request_id))

    def _forget_commands(self) -> None:
        self._outbox.clear()

    @property
    def is_alive(self) -> bool:
        return self.failure is None and not self._closed and self._proc.poll() is None

    def request_stats(self) -> Dict[str, float]:
        """Engine.stats() of the engine process (a round trip over the socket)."""
        with self._stats_lock:
            while not self._stats.empty():  # an answer that came after its caller gave up
                self._stats.get_nowait()
            with self._wake:
                if self.failure is not None or self._closed:
                    raise EngineDeadError(f"the engine is not running ({self.failure or 'closed'})")
                self._outbox.append("stats")
                self._wake.notify_all()
            try:
                return self._stats.get(timeout=_STATS_TIMEOUT_S)
            except queue.Empty:
                raise RuntimeError(f"the engine process did not answer for its stats within "
                                   f"{_STATS_TIMEOUT_S:g} s") from None

    def close(self) -> None:
        with self._wake:
            if self._closed:
                return
            self._closed = True
            self._outbox.append("close")
            self._wake.notify_all()
        self._receiver.join(_CLOSE_TIMEOUT_S)  # the engine aborts what runs; those outputs arrive first
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        self._sender.join(_EXIT_TIMEOUT_S)
        try:
            self._proc.wait(_EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            logger.error("the engine process did not stop within %g s: killed", _EXIT_TIMEOUT_S)
            self._proc.kill()
            self._proc.wait()
        self._conn.close()

    # ---- threads ----------------------------------------------------------------------------------
    def _send_loop(self) -> None:
        while True:
            with self._wake:
                while not self._outbox and not self._stopping:
                    self._wake.wait()
                if not self._outbox:
                    return
                batch = list(self._outbox)
                self._outbox.clear()
            for message in batch:
                try:
                    send(self._conn, message)
                except OSError:  # the process is gone: the receiver reports it
                    return

    def _receive_loop(self) -> None:
        while True:
            try:
                message = pickle.loads(self._conn.recv_bytes())
            except (EOFError, OSError):
                if not self._closed or self._sinks:  # nobody may be left waiting, closing or not
                    try:
                        self._proc.wait(_EXIT_TIMEOUT_S)
                    except subprocess.TimeoutExpired:
                        pass
                    self._die(f"the engine process {_process_exit_text(self._proc.poll())}")
                return
            kind = message[0]
            if kind == "outputs":
                self.engine.note_sessions(message[2])
                self._dispatch([unpack_output(fields) for fields in message[1]])
            elif kind == "stats":
                self._stats.put(message[1])
            elif kind == "failed":
                self._die(message[1])
            elif kind == "closed":
                return


def _import_tokenizer_libraries() -> None:
    from ..chat.tokenizer import Tokenizer  # noqa: F401
    import transformers  # noqa: F401


def _process_exit_text(code: Optional[int]) -> str:
    return "is still running but closed its socket" if code is None else exit_text(code)
