"""The OpenAI-compatible HTTP server: `create_app(pipe, ...)` builds the FastAPI app.

Endpoints (docs/SERVING.md has the request and response shapes):
  GET  /health, GET /metrics (never need a key), GET /v1/models,
  POST /v1/chat/completions, POST /v1/completions (OpenAI's, streaming as SSE),
  POST /v1/chat/interactive (LMDeploy's stateful chat, interactive.py), POST /v1/encode.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Dict, List, Optional, Sequence

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse, Response

from ...config import GenerationConfig
from ..metrics import ServerMetrics
from .errors import (ApiKeyMiddleware, ConcurrencyLimit, OpenAIError, RequestIdMiddleware, install_error_handlers,
                     internal_error, request_id)
from .generation import (RequestGroup, Sample, collect_samples, generation_config, respond, safe_logprob,
                         submit_all, token_text, top_entries)
from .launch import DEFAULT_MAX_REQUEST_BYTES
from .limits import BodySizeLimit, check_choices, check_max_tokens, check_prompt_chars, server_limits
from .protocol import (ChatCompletionRequest, ChatCompletionResponse, CompletionRequest, CompletionResponse,
                       EncodeRequest, EncodeResponse, ErrorResponse, ModelCard, ModelList, SamplingFields)

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500)}
SSE_MEDIA_TYPE = "text/event-stream"


class ServerState:
    """What the routes share: the pipeline (engine, tokenizer, chat template) and the server's settings."""

    def __init__(self, pipe, model_name: str, max_concurrent_requests: Optional[int],
                 max_request_bytes: Optional[int]):
        self.pipe = pipe
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

    def sampling_config(self, body: SamplingFields, prompt_len: int, max_tokens: Optional[int],
                        logprobs: Optional[int]) -> GenerationConfig:
        config = generation_config(
            max_tokens=max_tokens, default_max_tokens=max(1, self.max_total_tokens - prompt_len),
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, stop=body.stop, logprobs=logprobs,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, min_p=body.min_p,
            repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos,
            skip_special_tokens=body.skip_special_tokens, min_new_tokens=body.min_new_tokens)
        return self.pipe.with_template_stops(config)

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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _output_events(rid: str, group, num_top: Optional[int], chunk_of: Callable[[int, Any], dict],
                         usage_chunk: Callable[[dict], dict], prompt_tokens: Optional[int]) -> AsyncIterator[str]:
    """The SSE events of a streamed group: `chunk_of(index, output)` for every output that carries
    text, log-probs or the finish; with `prompt_tokens` (stream_options.include_usage) a last
    `usage_chunk(usage)`; then [DONE]. An engine error ends the stream with an error event."""
    generated = [0] * len(group)
    async for index, out in group.outputs():
        if out.finish_reason == "error":
            yield _sse_error(rid, out.error)
            break
        generated[index] = out.num_generated_tokens
        if out.new_text or out.finished or (num_top is not None and out.new_logprobs):
            yield _sse(chunk_of(index, out))
    else:
        if prompt_tokens is not None:
            yield _sse(usage_chunk(_usage(prompt_tokens, sum(generated))))
    yield "data: [DONE]\n\n"


def _sse_error(rid: str, sample_error: Optional[str]) -> str:
    return _sse(internal_error(rid, f"generation failed: {sample_error}").body())


# ---------------------------------------------------------------------- chat
async def chat_completions(state: ServerState, body: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    max_tokens, max_tokens_field = ((body.max_completion_tokens, "max_completion_tokens")
                                    if body.max_completion_tokens else (body.max_tokens, "max_tokens"))
    check_max_tokens(state.limits, max_tokens, max_tokens_field)
    messages = [m.as_template_message() for m in body.messages]
    check_prompt_chars(state.limits, sum(len(m["content"]) for m in messages), "messages")
    prompt_ids = await asyncio.to_thread(state.encode_messages, messages)
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    config = state.sampling_config(body, len(prompt_ids), max_tokens, num_top)
    n, group = body.n or 1, state.new_group()
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}

    async def body_response() -> Response:
        samples = await collect_samples(group)
        choices = [{"index": i, "message": {"role": "assistant", "content": s.text},
                    "logprobs": state.chat_logprobs(s.token_ids, s.logprobs, num_top) if num_top is not None else None,
                    "finish_reason": s.finish_reason} for i, s in enumerate(samples)]
        usage = _usage(len(prompt_ids), sum(s.num_generated_tokens for s in samples))
        return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        chunk = {**head, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}
        for i in range(n):
            yield _sse({**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                              "logprobs": None, "finish_reason": None}], **extra})

        def delta_chunk(index: int, out) -> dict:
            logprobs = (state.chat_logprobs(out.new_token_ids, out.new_logprobs, num_top)
                        if num_top is not None and out.new_logprobs else None)
            return {**chunk, "choices": [{"index": index, "delta": {"content": out.new_text}, "logprobs": logprobs,
                                          "finish_reason": out.finish_reason if out.finished else None}], **extra}

        async for event in _output_events(request_id(request), group, num_top, delta_chunk,
                                          lambda usage: {**chunk, "choices": [], "usage": usage},
                                          len(prompt_ids) if include_usage else None):
            yield event

    return await respond(request, state.limit, group, bool(body.stream), events, SSE_MEDIA_TYPE, body_response,
                         lambda: submit_all(group, state.validate, [prompt_ids], [config], n, body.seed, "messages"))


# ---------------------------------------------------------------------- completions
def _completion_prompts(state: ServerState, prompt) -> List[List[int]]:
    """Token ids of each prompt: text is encoded as is (no chat template), ids are taken as given."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return [state.pipe.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]


def _check_text_chars(state: ServerState, texts, param: str) -> None:
    for text in [texts] if isinstance(texts, str) else texts:
        if isinstance(text, str):
            check_prompt_chars(state.limits, len(text), param)


async def completions(state: ServerState, body: CompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    check_max_tokens(state.limits, body.max_tokens, "max_tokens")
    single = isinstance(body.prompt, str) or isinstance(body.prompt[0], int)
    check_choices(state.limits, 1 if single else len(body.prompt), body.n or 1)
    _check_text_chars(state, body.prompt, "prompt")
    prompts = await asyncio.to_thread(_completion_prompts, state, body.prompt)
    num_top = body.logprobs
    configs = [state.sampling_config(body, len(ids), body.max_tokens, num_top) for ids in prompts]
    n, group = body.n or 1, state.new_group()
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    prompt_tokens = sum(len(ids) for ids in prompts)

    async def body_response() -> Response:
        samples: List[Sample] = await collect_samples(group)
        choices = [{"index": i, "text": s.text, "finish_reason": s.finish_reason,
                    "logprobs": state.completion_logprobs(s.token_ids, s.logprobs, num_top, 0)
                    if num_top is not None else None} for i, s in enumerate(samples)]
        usage = _usage(prompt_tokens, sum(s.num_generated_tokens for s in samples))
        return JSONResponse({**head, "choices": choices, "usage": usage})

    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        extra = {"usage": None} if include_usage else {}
        offsets = [0] * len(group)  # characters of each choice's text sent so far

        def text_chunk(index: int, out) -> dict:
            logprobs = None
            if num_top is not None and out.new_logprobs:
                logprobs = state.completion_logprobs(out.new_token_ids, out.new_logprobs, num_top, offsets[index])
            offsets[index] += len(out.new_text)
            return {**head, "choices": [{"index": index, "text": out.new_text, "logprobs": logprobs,
                                         "finish_reason": out.finish_reason if out.finished else None}], **extra}

        async for event in _output_events(request_id(request), group, num_top, text_chunk,
                                          lambda usage: {**head, "choices": [], "usage": usage},
                                          prompt_tokens if include_usage else None):
            yield event

    return await respond(request, state.limit, group, bool(body.stream), events, SSE_MEDIA_TYPE, body_response,
                         lambda: submit_all(group, state.validate, prompts, configs, n, body.seed, "prompt"))


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

    @app.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
    async def models():
        card = ModelCard(id=state.model_name, created=state.created, max_model_len=state.max_total_tokens,
                         tidemind={"limits": state.limits})
        return {"object": "list", "data": [card.model_dump()]}

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
        _check_text_chars(state, body.input, "input")
        return await asyncio.to_thread(encode, state, body)


def create_app(pipe, model_name: str, api_keys: Optional[Sequence[str]] = None,
               max_concurrent_requests: Optional[int] = None, cors: Optional[dict] = None,
               max_request_bytes: Optional[int] = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The server's app around a Pipeline. `cors`: CORSMiddleware keyword arguments (None: no CORS);
    `max_request_bytes`: None for no limit on request bodies."""
    from .interactive import add_interactive_route

    if max_concurrent_requests is not None and max_concurrent_requests < 1:
        raise ValueError(f"max_concurrent_requests={max_concurrent_requests} must be >= 1 (or unset for no limit)")
    if max_request_bytes is not None and max_request_bytes < 1:
        raise ValueError(f"max_request_bytes={max_request_bytes} must be >= 1 (or None for no limit)")
    app = FastAPI(title="tidemind", description="OpenAI-compatible server (plus LMDeploy's /v1/chat/interactive)")
    state = app.state.tidemind = ServerState(pipe, model_name, max_concurrent_requests, max_request_bytes)
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
