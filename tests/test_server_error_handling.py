"""The api_server's error handling without a model (milliseconds): request ids and 5xx bodies that
hold no internal text, 405 / 429 headers, the body-size limit while reading, and the 400 messages
of the request models (strict types, server limits, invalid Unicode)."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from starlette.testclient import TestClient

from tidemind.serve.openai.errors import (ConcurrencyLimit, OpenAIError, RequestIdMiddleware, install_error_handlers,
                                         validation_error)
from tidemind.serve.openai.limits import BodySizeLimit
from tidemind.serve.openai.protocol import (ChatCompletionRequest, CompletionRequest, EncodeRequest,
                                            InteractiveRequest)

SECRET = "RuntimeError: CUDA out of memory in /opt/models/secret-path/layer.py"
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


# ---------------------------------------------------------------------- request ids, 5xx, 405, 429
@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/crash")
    async def crash():
        raise RuntimeError(SECRET)

    @app.post("/engine-failed")
    async def engine_failed():
        raise OpenAIError(500, f"generation failed: {SECRET}")

    @app.post("/chat")
    async def chat(body: ChatCompletionRequest):
        return {"ok": True}

    app.add_middleware(RequestIdMiddleware)
    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("path", ["/crash", "/engine-failed"])
def test_a_5xx_body_holds_a_request_id_and_no_internal_text(client, path, caplog):
    with caplog.at_level(logging.ERROR, logger="tidemind"):
        response = client.post(path)
    assert response.status_code == 500
    error = response.json()["error"]
    rid = response.headers["x-request-id"]
    assert error["type"] == "server_error" and error["code"] == "internal_error"
    assert rid in error["message"] and "server log" in error["message"]
    assert "secret" not in response.text.lower() and "RuntimeError" not in response.text
    logged = [r for r in caplog.records if rid in r.getMessage()]
    assert logged and any(SECRET in (r.getMessage() + str(r.exc_info and r.exc_info[1])) for r in logged)


def test_a_stream_that_fails_ends_with_a_generic_error_event(caplog):
    from tidemind.messages import RequestOutput
    from tidemind.serve.openai.streaming import UsageOptions, output_events

    class FailedGroup:
        def __len__(self):
            return 1

        async def outputs(self):
            yield 0, RequestOutput(7, [], "", 3, 0, finished=True, finish_reason="error", error=SECRET)

    async def events():
        return [e async for e in output_events("rid-42", FailedGroup(), None, {}, 3, UsageOptions(False, False))]

    with caplog.at_level(logging.ERROR, logger="tidemind"):
        error_event, done = asyncio.run(events())
    assert done == "data: [DONE]\n\n" and "rid-42" in error_event and "secret" not in error_event.lower()
    assert any("rid-42" in r.getMessage() and SECRET in r.getMessage() for r in caplog.records)


def test_every_response_has_its_own_request_id(client):
    first, second = client.post("/chat", json=CHAT), client.post("/chat", json={"messages": []})
    assert first.status_code == 200 and second.status_code == 400
    assert len({first.headers["x-request-id"], second.headers["x-request-id"]}) == 2


def test_405_names_the_allowed_methods(client):
    response = client.get("/chat")
    assert response.status_code == 405 and response.headers["allow"] == "POST"
    assert response.json()["error"]["message"] == "GET is not allowed on /chat: use POST"


def test_the_schema_documents_400_for_invalid_bodies_not_fastapis_422(client):
    schema = client.get("/openapi.json").json()
    assert "422" not in json.dumps(schema["paths"]) and "HTTPValidationError" not in json.dumps(schema)


def test_429_says_when_to_retry():
    limit = ConcurrencyLimit(1)
    limit.acquire()
    with pytest.raises(OpenAIError) as caught:
        limit.acquire()
    response = caught.value.response()
    assert response.status_code == 429 and response.headers["retry-after"] == "1"


# ---------------------------------------------------------------------- the body-size limit
def _run_asgi(app, messages, headers=()):
    """Run one HTTP request through `app`; returns (status, body, how many receive() calls)."""
    scope = {"type": "http", "method": "POST", "path": "/", "headers": list(headers), "state": {}}
    queue = list(messages)
    sent = []
    calls = 0

    async def receive():
        nonlocal calls
        calls += 1
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, body, calls


async def _echo_length(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    after = await receive()  # a disconnect, from the server: the replayed body is not sent twice
    text = json.dumps({"length": len(body), "after": after["type"]}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": text})


def _chunks(*sizes):
    return [{"type": "http.request", "body": b"x" * size, "more_body": i < len(sizes) - 1}
            for i, size in enumerate(sizes)]


def test_a_body_over_the_content_length_limit_is_413_before_any_of_it_is_read():
    status, body, calls = _run_asgi(BodySizeLimit(_echo_length, 100), _chunks(50, 51),
                                    headers=[(b"content-length", b"101")])
    error = json.loads(body)["error"]
    assert status == 413 and calls == 0
    assert error["code"] == "request_too_large" and "100 bytes" in error["message"]
    assert "--max-request-bytes" in error["message"]


def test_a_chunked_body_is_counted_while_it_arrives():
    status, body, calls = _run_asgi(BodySizeLimit(_echo_length, 100), _chunks(60, 41, 10**6, 10**6))
    assert status == 413 and calls == 2 and json.loads(body)["error"]["code"] == "request_too_large"


def test_a_body_within_the_limit_reaches_the_app_once():
    status, body, _ = _run_asgi(BodySizeLimit(_echo_length, 100), _chunks(60, 40), [(b"content-length", b"100")])
    assert status == 200 and json.loads(body) == {"length": 100, "after": "http.disconnect"}


# ---------------------------------------------------------------------- the prompt character bound
def test_no_text_takes_fewer_tokens_than_the_character_bound_allows(request, tmp_path_factory):
    """prompt_chars = prompt tokens x max_token_chars must never refuse a prompt that fits."""
    import random

    from tidemind.chat.tokenizer import Tokenizer
    try:
        from test_detokenizer import smollm2_tokenizer_dir
    except ImportError:  # run from the repository root
        from tests.test_detokenizer import smollm2_tokenizer_dir

    tokenizer = Tokenizer.from_pretrained(smollm2_tokenizer_dir(request, tmp_path_factory))
    longest = tokenizer.max_token_chars
    rng = random.Random(0)
    texts = [" " * 5000, "\n" + " " * 4000, "=" * 3000, "\t" * 999, "汉字" * 500, "\U0001F600" * 300,
             "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(3000)),
             " ".join(rng.choice(["the", "internationalization", "  ", "\n\n", "{}"]) for _ in range(2000))]
    for text in texts:
        assert len(text) <= len(tokenizer.encode(text, add_bos=False)) * longest, text[:20]
    assert longest == max(len(token) for token in tokenizer.hf_tokenizer.get_vocab())


# ---------------------------------------------------------------------- request models' 400s
def refusal(model, body) -> OpenAIError:
    with pytest.raises(ValidationError) as caught:
        model.model_validate(body)
    # FastAPI reports body errors with "body" in front of the location
    errors = [{**e, "loc": ("body", *e["loc"])} for e in caught.value.errors()]
    error = validation_error(RequestValidationError(errors))
    assert error.status == 400
    return error


@pytest.mark.parametrize("model, body, param, words", [
    (ChatCompletionRequest, {**CHAT, "stream": "yes"}, "stream", "valid boolean, not a string"),
    (ChatCompletionRequest, {**CHAT, "max_tokens": "5"}, "max_tokens", "valid integer, not a string"),
    (ChatCompletionRequest, {**CHAT, "max_tokens": 5.5}, "max_tokens", "valid integer, not a number"),
    (ChatCompletionRequest, {**CHAT, "n": True}, "n", "valid integer, not a boolean"),
    (ChatCompletionRequest, {**CHAT, "temperature": "0.5"}, "temperature", "valid number, not a string"),
    (ChatCompletionRequest, {**CHAT, "logprobs": 1}, "logprobs", "valid boolean, not an integer"),
    (ChatCompletionRequest, {**CHAT, "repetition_penalty": float("inf")}, "repetition_penalty", "finite"),
    (CompletionRequest, {"prompt": "hi", "stream": 1}, "stream", "valid boolean"),
    (InteractiveRequest, {"prompt": "hi", "session_id": "3"}, "session_id", "valid integer, not a string"),
    (InteractiveRequest, {"prompt": "hi", "interactive_mode": "false"}, "interactive_mode", "valid boolean"),
    (EncodeRequest, {"input": "hi", "add_bos": "no"}, "add_bos", "valid boolean"),
])
def test_a_value_of_the_wrong_type_is_refused_not_converted(model, body, param, words):
    error = refusal(model, body)
    assert error.param == param and words in error.message, error.message


def test_integers_are_accepted_where_numbers_go():
    request = ChatCompletionRequest.model_validate({**CHAT, "temperature": 1, "top_p": 1, "presence_penalty": 0})
    assert request.temperature == 1.0 and isinstance(request.temperature, float)


@pytest.mark.parametrize("body, param, words", [
    ({**CHAT, "n": 17}, "n", "at most 16 choices"),
    ({**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "at most 20"),
    ({**CHAT, "stop": ["x"] * 33}, "stop", "at most 32 stop sequences"),
    ({**CHAT, "stop": "x" * 257}, "stop", "at most 256 characters"),
    ({**CHAT, "stop": ["ok", "x" * 257]}, "stop", "at most 256 characters"),
])
def test_a_value_over_a_server_limit_names_the_limit(body, param, words):
    error = refusal(ChatCompletionRequest, body)
    assert error.param == param and words in error.message and "GET /v1/models" in error.message, error.message


def test_completions_logprobs_limit_and_precise_union_errors():
    error = refusal(CompletionRequest, {"prompt": "hi", "logprobs": 21})
    assert "logprobs: at most 20" in error.message
    assert refusal(ChatCompletionRequest, {**CHAT, "stop": ["a", ""]}).message.startswith("stop.1: String should")
    # a value of no accepted form: one line for the field, not one per form
    assert refusal(CompletionRequest, {"prompt": [[1, "x"]]}).message == \
        "prompt: must be a string, a list of strings, a list of token ids, or a list of lists of token ids (non-empty)"


@pytest.mark.parametrize("model, body, where, param", [
    (ChatCompletionRequest, {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages.0.content", "messages"),
    (ChatCompletionRequest, {**CHAT, "model": "\udfff"}, "model", "model"),
    (ChatCompletionRequest, {**CHAT, "stop": ["ok", "\ud83d"]}, "stop.1", "stop"),
    (CompletionRequest, {"prompt": ["ok", "\ud800"]}, "prompt.1", "prompt"),
    (InteractiveRequest, {"prompt": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "prompt.0.content.0.text", "prompt"),
    (EncodeRequest, {"input": "\ud800"}, "input", "input"),
    (ChatCompletionRequest, {**CHAT, "\ud800": 1}, "(a field name)", None),
])
def test_a_lone_surrogate_is_400_naming_where_it_is(model, body, where, param):
    error = refusal(model, body)
    assert error.message.startswith(f"{where}: the text holds a lone UTF-16 surrogate") and error.param == param
    json.dumps(error.body(), ensure_ascii=False).encode()  # the answer itself is valid UTF-8


def test_a_surrogate_pair_is_a_character_and_a_non_object_body_is_a_400():
    body = json.loads('{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}')
    assert ChatCompletionRequest.model_validate(body).messages[0].content == "\U0001F600"
    for body in (None, 5, ["a"]):
        assert "JSON object" in refusal(ChatCompletionRequest, body).message
