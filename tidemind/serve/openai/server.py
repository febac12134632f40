"""The OpenAI-compatible HTTP server: `create_app(pipe, ...)` builds the FastAPI app.

Endpoints (docs/SERVING.md has the request and response shapes):
  GET  /health, GET /metrics (never need a key), GET /v1/models, GET /v1/models/{model},
  POST /v1/chat/completions (chat.py), POST /v1/completions (completions.py), both streaming as SSE,
  POST /v1/chat/interactive (LMDeploy's stateful chat, interactive.py), POST /v1/encode.
"""
from __future__ import annotations

import asyncio
import time
from typing import Dict, List, Optional, Sequence

from fastapi import FastAPI, Request
from starlette.responses import Response

from ...config import GenerationConfig
from ..metrics import ServerMetrics
from .chat import chat_completions
from .completions import check_text_chars, completions
from .errors import (ApiKeyMiddleware, ConcurrencyLimit, OpenAIError, RequestIdMiddleware, install_error_handlers)
from .extensions import UnknownFieldPolicy
from .generation import RequestGroup, safe_logprob, token_text, top_entries
from .launch import DEFAULT_MAX_REQUEST_BYTES
from .limits import BodySizeLimit, server_limits
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       EncodeRequest, EncodeResponse, ErrorResponse, ModelCard, ModelList)

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500)}
SSE_MEDIA_TYPE = "text/event-stream"


class ServerState:
    """What the routes share: the pipeline (engine, tokenizer, chat template) and the server's settings."""

    def __init__(self, pipe, model_name: str, max_concurrent_requests: Optional[int],
                 max_request_bytes: Optional[int], strict_fields: bool = False):
        self.pipe = pipe
        self.fields = UnknownFieldPolicy(strict_fields)
        self.notes: List[bool] = []  # things said once per server (extensions.chat_template_kwargs_note)
        self.model_name = model_name
        self.created = int(time.time())
        self.limit = ConcurrencyLimit(max_concurrent_requests, on_reject=lambda: self.metrics.rejected.inc())
        self.metrics = ServerMetrics(pipe.engine.stats, lambda: self.limit.in_flight)
        self.token_texts: Dict[int, str] = {}  # token id -> its text, for logprobs
        self.limits = server_limits(self.max_total_tokens, pipe.tokenizer.max_token_chars, max_request_bytes)

    @property
    def max_total_tokens(self) -> int:
        return self.pipe.engine.max_total_tokens

    def check_model(self, name: Optional[str]) -> None:
        if name is not None and name != self.model_name:
            raise OpenAIError(404, f"the model '{name}' does not exist: this server serves '{self.model_name}' "
                                   f"(GET /v1/models)", param="model", code="model_not_found")

    def validate(self, prompt_ids: Sequence[int], config: GenerationConfig, session_id: Optional[int] = None):
        self.pipe.engine.validate_request(prompt_ids, config, session_id)

    def new_group(self) -> RequestGroup:
        return RequestGroup(self.pipe.async_engine, self.metrics)

    def encode_chat(self, messages: List[Dict], plan=None, template_kwargs: Optional[dict] = None) -> List[int]:
        """Chat-template rendering (with the tools of a ToolPlan, or chat_template_kwargs for the model's
        own template) plus tokenization: run it in a worker thread."""
        from ...chat.tools import prompt_with_tools

        template = self.pipe.chat_template
        try:
            if plan is not None:
                text = plan.prompt(template, messages)
            elif any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
                text = prompt_with_tools(template, messages, [])  # earlier calls and results, no tools offered
            elif template_kwargs:
                text = template.messages2prompt(messages, template_kwargs=template_kwargs)
            else:
                text = template.messages2prompt(messages)
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="messages") from None
        return self.pipe.tokenizer.encode(text)

    def encode_messages(self, messages: List[Dict[str, str]], sequence_start: bool = True) -> List[int]:
        """Chat-template rendering plus tokenization (run it in a worker thread)."""
        try:
            text = self.pipe.chat_template.messages2prompt(messages, sequence_start=sequence_start)
        except ValueError as exc:
            raise OpenAIError(400, str(exc), param="messages") from None
        return self.pipe.tokenizer.encode(text, add_bos=sequence_start)

    def token(self, token_id: int) -> str:
        return token_text(self.pipe.tokenizer, token_id, self.token_texts)

    # ------------------------------------------------------------ logprobs in OpenAI's shapes
    def chat_logprobs(self, token_ids: Sequence[int], entries: Sequence[Dict[int, float]], num_top: int) -> dict:
        content = []
        for token_id, entry in zip(token_ids, entries):
            text = self.token(token_id)
            tops = [{"token": self.token(t), "logprob": safe_logprob(v), "bytes": list(self.token(t).encode())}
                    for t, v in top_entries(entry, num_top)]
            content.append({"token": text, "logprob": safe_logprob(entry[token_id]), "bytes": list(text.encode()),
                            "top_logprobs": tops})
        return {"content": content}

    def completion_logprobs(self, token_ids: Sequence[int], entries: Sequence[Dict[int, float]], num_top: int,
                            offset: int) -> dict:
        tokens, values, tops, offsets = [], [], [], []
        for token_id, entry in zip(token_ids, entries):
            text = self.token(token_id)
            tokens.append(text)
            values.append(safe_logprob(entry[token_id]))
            tops.append({self.token(t): safe_logprob(v) for t, v in top_entries(entry, num_top)})
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


# ---------------------------------------------------------------------- the rest
def encode(state: ServerState, body: EncodeRequest) -> dict:
    texts = [body.input] if isinstance(body.input, str) else body.input
    ids = []
    for text in texts:
        if body.do_preprocess:
            text = state.pipe.chat_template.messages2prompt([{"role": "user", "content": text}])
        ids.append(state.pipe.tokenizer.encode(text, add_bos=body.add_bos))
    if isinstance(body.input, str):
        return {"input_ids": ids[0], "length": len(ids[0])}
    return {"input_ids": ids, "length": [len(i) for i in ids]}


def _add_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/health", summary="200 while the engine runs; 503 once it has stopped after a failure "
                                "(no API key needed)", responses={503: {"description": "the engine stopped"}})
    async def health() -> dict:
        if not state.pipe.async_engine.is_alive:
            raise OpenAIError(503, "the engine stopped after a failure; this server is shutting down",
                              code="engine_dead")
        return {"status": "ok"}

    @app.get("/metrics", summary="Prometheus metrics (no API key needed)", response_class=Response)
    async def metrics() -> Response:
        data, content_type = state.metrics.render()
        return Response(content=data, media_type=content_type)

    def card() -> dict:
        return ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_total_tokens,
                         tidemind={"limits": state.limits}).model_dump()

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def models():
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES,
             summary="one served model, by name (404 model_not_found for any other)")
    async def model(model: str):
        state.check_model(model)
        return card()

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES,
              summary="OpenAI chat completions; with stream=true, SSE chunks ending with data: [DONE]")
    async def chat(body: ChatCompletionRequest, request: Request):
        return await chat_completions(state, body, request)

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES,
              summary="OpenAI completions (no chat template); with stream=true, SSE chunks ending with data: [DONE]")
    async def complete(body: CompletionRequest, request: Request):
        return await completions(state, body, request)

    @app.post("/v1/encode", response_model=EncodeResponse, responses=ERROR_RESPONSES,
              summary="token ids of a text (or texts), optionally through the chat template")
    async def encode_route(body: EncodeRequest):
        check_text_chars(state, body.input, "input")
        return await asyncio.to_thread(encode, state, body)


def create_app(pipe, model_name: str, api_keys: Optional[Sequence[str]] = None,
               max_concurrent_requests: Optional[int] = None, cors: Optional[dict] = None,
               max_request_bytes: Optional[int] = DEFAULT_MAX_REQUEST_BYTES, strict_fields: bool = False) -> FastAPI:
    """The server's app around a Pipeline. `cors`: CORSMiddleware keyword arguments (None: no CORS);
    `max_request_bytes`: None for no limit on request bodies; `strict_fields`: refuse request fields
    that no model knows (else they are ignored, logged once per name)."""
    from .interactive import add_interactive_route

    if max_concurrent_requests is not None and max_concurrent_requests < 1:
        raise ValueError(f"max_concurrent_requests={max_concurrent_requests} must be >= 1 (or unset for no limit)")
    if max_request_bytes is not None and max_request_bytes < 1:
        raise ValueError(f"max_request_bytes={max_request_bytes} must be >= 1 (or None for no limit)")
    app = FastAPI(title="tidemind", description="OpenAI-compatible server (plus LMDeploy's /v1/chat/interactive)")
    state = app.state.tidemind = ServerState(pipe, model_name, max_concurrent_requests, max_request_bytes,
                                             strict_fields)
    install_error_handlers(app)
    _add_routes(app, state)
    add_interactive_route(app, state)
    # Added first = innermost. A request meets, in turn: its id, CORS, the key check, the body size.
    if max_request_bytes is not None:
        app.add_middleware(BodySizeLimit, max_bytes=max_request_bytes)
    if api_keys:
        app.add_middleware(ApiKeyMiddleware, api_keys=list(api_keys))
    if cors is not None:  # outside the checks: preflights and error answers get CORS headers too
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, **cors)
    app.add_middleware(RequestIdMiddleware)
    return app
