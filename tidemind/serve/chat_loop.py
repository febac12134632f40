"""One chat, whatever answers it: the Conversation interface, its in-process implementation, and
the terminal read loop shared by `tidemind chat` and `tidemind serve api_client`.

A Conversation is one multi-turn chat whose KV cache stays with the engine between turns (in this
process through a Pipeline, or in an api_server: see client.RemoteConversation). The web page
(gradio_app.py) holds one per browser session.

Light imports only: nothing here loads torch, httpx or gradio.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Iterator, Optional, Protocol, TextIO

from ..config import GenerationConfig

logger = logging.getLogger("tidemind")

END_WORD = "end"  # starts a new conversation
EXIT_WORD = "exit"  # quits

# GenerationConfig fields that make sense for a person chatting (the CLI's generation flags).
CHAT_GEN_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p",
                   "repetition_penalty", "random_seed", "stop_words")


class ChatTurnError(Exception):
    """A turn that could not run; the message says why and what to do. `restarted`: the
    conversation was ended because of it (e.g. it outgrew session_len), the next turn starts afresh."""

    def __init__(self, message: str, restarted: bool = False):
        super().__init__(message)
        self.restarted = restarted


class Conversation(Protocol):
    def send(self, prompt: str, gen_config: GenerationConfig) -> Iterator[str]:
        """Start a turn; iterate for the answer's text deltas. Closing the iterator early, or
        cancel(), aborts the turn, and an aborted turn leaves the conversation as it was before it.
        Raises ChatTurnError when the turn cannot run."""

    def cancel(self) -> None:
        """Abort the running turn, if any (safe from any thread); send()'s iterator then ends."""

    def reset(self) -> None:
        """Forget the conversation and free its KV; the next send() starts a new one."""

    def close(self) -> None:
        """reset(), for good (the page's browser session or the terminal is gone)."""


class LocalConversation:
    """A conversation with an in-process Pipeline."""

    def __init__(self, pipe):
        self._pipe = pipe
        self._session = None  # tidemind.api.Session; None until the first turn, and after reset()
        self._cancelled = threading.Event()
        self._busy = threading.Lock()  # held while a turn streams: one turn at a time

    def send(self, prompt: str, gen_config: GenerationConfig) -> Iterator[str]:
        if not self._busy.acquire(blocking=False):
            raise ChatTurnError("an answer is still being written: wait for it, or stop it, first")
        try:
            self._cancelled.clear()
            session = self._session = self._session or self._pipe.new_session()
            stream = self._start_turn(prompt, session, gen_config)
            try:
                for delta in stream:
                    if self._cancelled.is_set():
                        break
                    if delta.finish_reason == "error":
                        raise ChatTurnError("the engine could not run this turn (its log says why)")
                    if delta.text:
                        yield delta.text
            finally:
                stream.close()  # aborts the engine request when the turn did not finish
        finally:
            self._busy.release()

    def _start_turn(self, prompt: str, session, gen_config: GenerationConfig):
        try:
            return self._pipe.chat(prompt, session=session, gen_config=gen_config, stream_response=True)
        except ValueError as exc:
            self.reset()  # e.g. the conversation outgrew session_len
            raise ChatTurnError(f"{exc}; starting a new conversation", restarted=True) from None

    def cancel(self) -> None:
        self._cancelled.set()

    def reset(self) -> None:
        self._cancelled.set()
        session, self._session = self._session, None
        if session is not None:
            # A fresh Session (new id) next time: the old object may still be touched by a turn
            # that is finishing in another thread, and the engine aborts that turn on ending.
            self._pipe.end_session(session)

    close = reset


def read_line(interactive: bool, stdin: TextIO = None) -> Optional[str]:
    """The next input line (None at end of input); on a TTY with a `>>>` prompt."""
    stdin = stdin or sys.stdin
    try:
        return input("\n>>> ") if interactive else stdin.readline() or None
    except EOFError:
        return None


class StopOnCtrlC:
    """While an answer streams, the first Ctrl-C only asks it to stop (`pressed`): the stream is
    then left between two chunks and closed normally. A KeyboardInterrupt raised at a random point
    could land inside the HTTP client's connection pool while it holds its lock, and the cancel that
    follows (a request on the same pool) then waited forever. A second Ctrl-C raises at once, for an
    answer whose next chunk does not come. Off the main thread (no signal handlers there) it does
    nothing."""

    def __init__(self):
        self.pressed = False
        self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True

    def __enter__(self) -> "StopOnCtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def stream_answer(conversation: Conversation, prompt: str, gen_config: GenerationConfig,
                  out: TextIO = None) -> None:
    """Write one answer to `out` as it arrives.

    Invariant for pipes: every prompt gets exactly one answer terminated by a newline on `out`,
    empty when the turn failed or was cancelled; messages go to stderr. Ctrl-C cancels the turn.
    """
    out = out or sys.stdout
    try:
        with StopOnCtrlC() as ctrl_c:
            answer = conversation.send(prompt, gen_config)
            try:
                for text in answer:
                    out.write(text)
                    out.flush()
                    if ctrl_c.pressed:
                        break
            finally:
                answer.close()  # a turn left early drops its stream
        cancelled = ctrl_c.pressed
    except ChatTurnError as exc:
        out.write("\n")
        out.flush()
        print(f"[{exc}]", file=sys.stderr, flush=True)
        return
    except KeyboardInterrupt:
        cancelled = True
    if cancelled:
        conversation.cancel()
    out.write("\n")
    out.flush()
    if cancelled:
        print("[cancelled]", file=sys.stderr, flush=True)


def run_chat_loop(conversation: Conversation, gen_config: GenerationConfig, interactive: bool) -> int:
    """Read prompts until `exit` or end of input; `end` starts a new conversation."""
    try:
        while True:
            line = read_line(interactive)
            if line is None or line.strip() == EXIT_WORD:
                return 0
            prompt = line.strip()
            if not prompt:
                continue
            if prompt == END_WORD:
                conversation.reset()
                if interactive:
                    print("(new conversation)", file=sys.stderr)
                continue
            stream_answer(conversation, prompt, gen_config)
    finally:
        try:
            conversation.close()
        except Exception as exc:  # leaving anyway (the server may be gone); it frees idle sessions itself
            logger.debug("could not end the conversation: %s", exc)
