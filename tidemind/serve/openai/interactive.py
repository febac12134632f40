"""POST /v1/chat/interactive: LMDeploy's stateful chat, on the engine's sessions.

A conversation (session_id >= 0, interactive_mode=true) keeps its token history and KV cache in the
engine between turns, so a turn computes only its own tokens. The server mirrors, per session,
whether the engine holds a history, which decides how a turn is rendered:

    first turn:  messages2prompt(turn, sequence_start=True), encoded with BOS
    later turns: messages2prompt(turn, sequence_start=False), no BOS (the history has it)

Invariant: `ChatSession.started` is true iff a turn of the session finished with "stop" or "length"
since the session was (re)opened: exactly when the engine keeps the turn's tokens as history (an
aborted turn is forgotten by the engine and changes nothing here either). All of it runs on the
event loop, so no lock is needed.
"""
from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Set

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from .errors import OpenAIError, internal_error, request_id
from .generation import RequestGroup, Sample, generation_config, respond
from .limits import check_prompt_chars
from .protocol import InteractiveRequest, InteractiveResponse

NDJSON_MEDIA_TYPE = "application/x-ndjson"


@dataclass
class ChatSession:
    started: bool = False
    num_tokens: int = 0  # tokens of the conversation the engine keeps (history of the next turn)
    turn: Optional["Turn"] = None  # the running turn


class SessionTable:
    def __init__(self, async_engine):
        self._engine = async_engine
        self._sessions: Dict[int, ChatSession] = {}
        self.background: Set[asyncio.Task] = set()  # turns waiting for their abort to be confirmed

    def get(self, session_id: int) -> Optional[ChatSession]:
        return self._sessions.get(session_id)

    def open(self, session_id: int) -> ChatSession:
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = ChatSession()
        return session

    def end(self, session_id: int) -> None:
        """Forget the conversation; the engine frees its KV and aborts a running turn."""
        if self._sessions.pop(session_id, None) is not None:
            self._engine.end_session(session_id)

    def is_current(self, session_id: int, session: ChatSession) -> bool:
        return self._sessions.get(session_id) is session


class Turn:
    """One turn's engine request and what it produced. The session stays busy with it until the
    engine has sent the request's final output, even when the HTTP request ended earlier (client
    gone): only that output says whether the engine kept the turn in the conversation."""

    def __init__(self, table: SessionTable, session_id: int, session: Optional[ChatSession], group: RequestGroup):
        self.table, self.session_id, self.session, self.group = table, session_id, session, group
        self.sample = Sample()
        self.submitted = False

    def close(self) -> None:
        """Called once the HTTP request is over and the group aborted."""
        if not self.submitted or self.session is None:
            return
        if self.group.done:
            self._settle()
        else:  # the loop keeps only weak references to tasks: the table holds this one
            task = asyncio.ensure_future(self._drain())
            self.table.background.add(task)
            task.add_done_callback(self.table.background.discard)

    async def _drain(self) -> None:
        async for _, out in self.group.outputs():
            self.sample.add(out)
        self._settle()

    def _settle(self) -> None:
        session = self.session
        if not self.table.is_current(self.session_id, session):
            return  # the session was ended meanwhile
        if session.turn is self:
            session.turn = None
        if self.sample.finish_reason in ("stop", "length"):
            session.started = True
            session.num_tokens = self.sample.num_prompt_tokens + self.sample.num_generated_tokens


def _turn_messages(prompt) -> List[Dict[str, str]]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [m.as_template_message() for m in prompt]


def _reply(sample: Sample, text: str, finish_reason: Optional[str]) -> dict:
    return InteractiveResponse(text=text, tokens=sample.num_generated_tokens, input_tokens=sample.num_prompt_tokens,
                               history_tokens=sample.num_cached_tokens, finish_reason=finish_reason).model_dump()


def _control_reply(finish_reason: Optional[str]) -> JSONResponse:
    return JSONResponse(InteractiveResponse(text="", tokens=0, input_tokens=0, history_tokens=0,
                                            finish_reason=finish_reason).model_dump())


def _control(table: SessionTable, body: InteractiveRequest) -> Optional[Response]:
    """The calls that generate nothing: cancel, and the end call; None for a generating request."""
    sid = body.session_id
    if body.cancel:
        session = table.get(sid)
        running = session is not None and session.turn is not None and not session.turn.group.done
        if running:
            session.turn.group.abort()  # the turn's own HTTP request ends with finish_reason "abort"
        return _control_reply("abort" if running else None)
    if not body.interactive_mode:
        table.end(sid)
        if not body.prompt:
            return _control_reply(None)  # the "end" call
    elif not body.prompt:
        raise OpenAIError(400, "the prompt is empty: send this turn's text (an empty prompt with "
                               "interactive_mode=false ends the session)", param="prompt")
    return None


def _check_idle(table: SessionTable, sid: int, session: Optional[ChatSession]) -> None:
    if session is None:
        return
    if not table.is_current(sid, session):
        raise OpenAIError(400, f"session {sid} was ended while this turn was prepared: send the turn again",
                          param="session_id")
    if session.turn is not None:
        raise OpenAIError(400, f"session {sid} is busy with another turn: wait for it to finish, or cancel it "
                               f"(cancel=true) first", param="session_id")


async def interactive(state, table: SessionTable, body: InteractiveRequest, request: Request) -> Response:
    state.fields.check(body)
    if body.adapter_name:
        raise OpenAIError(400, "adapter_name: tidemind serves no LoRA adapters; leave it out", param="adapter_name")
    control = _control(table, body)
    if control is not None:
        return control
    messages = _turn_messages(body.prompt)
    check_prompt_chars(state.limits, sum(len(m["content"]) for m in messages), "prompt")
    sid = body.session_id
    session = table.open(sid) if body.interactive_mode else None
    _check_idle(table, sid, session)
    first_turn = session is None or not session.started
    prompt_ids = await asyncio.to_thread(state.encode_messages, messages, first_turn)
    _check_idle(table, sid, session)  # nothing may have changed during the await: checked again
    history = session.num_tokens if session is not None else 0
    config = state.pipe.with_template_stops(generation_config(
        max_tokens=body.request_output_len if body.request_output_len is not None else body.max_tokens,
        default_max_tokens=max(1, state.max_total_tokens - history - len(prompt_ids)),
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, stop=body.stop,
        repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens))
    turn = Turn(table, sid, session, state.new_group())

    def start() -> None:
        try:
            turn.group.submit(prompt_ids, config, seed=body.seed, session_id=sid if session is not None else None)
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="prompt") from None
        turn.submitted = True
        if session is not None:
            session.turn = turn

    async def whole_turn() -> Response:
        async for _, out in turn.group.outputs():
            turn.sample.add(out)
        if turn.sample.finish_reason == "error":
            raise OpenAIError(500, f"generation failed: {turn.sample.error}")
        return JSONResponse(_reply(turn.sample, turn.sample.text, turn.sample.finish_reason))

    async def lines():
        async for _, out in turn.group.outputs():
            turn.sample.add(out)
            if out.new_text or out.finished:
                line = _reply(turn.sample, out.new_text, out.finish_reason if out.finished else None)
                if out.finish_reason == "error":  # the non-stream answer would be a 500 with this body
                    line.update(internal_error(request_id(request), f"generation failed: {out.error}").body())
                yield json.dumps(line, ensure_ascii=False) + "\n"

    return await respond(request, state.limit, turn.group, body.stream, lines, NDJSON_MEDIA_TYPE, whole_turn,
                         start, on_close=[turn.close])


def add_interactive_route(app: FastAPI, state) -> None:
    table = SessionTable(state.pipe.async_engine)
    from .server import ERROR_RESPONSES

    @app.post("/v1/chat/interactive", response_model=InteractiveResponse, responses=ERROR_RESPONSES,
              summary="LMDeploy's stateful chat: sessions keep their KV cache between turns; with stream=true, "
                      "one JSON object per line")
    async def chat_interactive(body: InteractiveRequest, request: Request):
        return await interactive(state, table, body, request)
