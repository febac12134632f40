"""Bad requests to `tidemind serve api_server` get the right status and OpenAI's error body, and
nothing else is lost: API keys, the in-flight limit, the session length, the request limits (body
size, prompt characters, max_tokens; listed by /v1/models), invalid Unicode and wrong types, and a
schemathesis run over the server's own OpenAPI schema that must find no 5xx and no invalid request
accepted."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from serve_fixtures import api_server, free_port, metrics

pytestmark = pytest.mark.slow

SESSION_LEN = 256
MAX_REQUEST_BYTES = 8 * 2**20
KEYS = ("sk-first", "sk-second")
AUTH = {"Authorization": f"Bearer {KEYS[0]}"}
CHAT = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "temperature": 0}


ORIGIN = "http://chat.example"


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return str(tmp_path_factory.mktemp("server") / "api_server.log")


@pytest.fixture(scope="module")
def server(server_log):
    down_proxy = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with api_server("--session-len", str(SESSION_LEN), "--api-keys", *KEYS, "--max-concurrent-requests", "1",
                    "--model-name", "tiny", "--allow-origins", ORIGIN, "--proxy-url", down_proxy,
                    "--max-request-bytes", str(MAX_REQUEST_BYTES), log_path=server_log) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEYS[1], max_retries=0)


def assert_openai_error(response: httpx.Response, status: int, code=None, param=None) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if code is not None:
        assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error["message"]


def still_serving(client) -> None:
    answer = client.chat.completions.create(model="tiny", **CHAT)
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1


def wait_idle(url: str, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        # blocks are free but those that interactive sessions keep between turns
        idle = m["tidemind_http_requests_in_flight"] == 0 and m["tidemind_num_requests_running"] == 0 and \
            m["tidemind_kv_cache_blocks_free"] + m["tidemind_kv_cache_blocks_idle_sessions"] == \
            m["tidemind_kv_cache_blocks_total"]
        if idle or time.time() > deadline:
            return m
        time.sleep(0.05)


# ---------------------------------------------------------------------- bad bodies
def test_malformed_json_is_400(server, client):
    post = lambda content: httpx.post(f"{server}/v1/chat/completions", content=content,
                                      headers={**AUTH, "Content-Type": "application/json"})
    assert "not valid JSON" in assert_openai_error(post(b'{"messages": [ '), 400)
    assert "JSON object" in assert_openai_error(post(b'[1, 2]'), 400)
    assert "'messages' is required" in assert_openai_error(post(b'{}'), 400, param="messages")
    # an unknown field is ignored (logged once; --strict-fields refuses it): the empty messages are the error
    assert "at least 1 item" in assert_openai_error(post(b'{"frobnicate": 1, "messages": []}'), 400, param="messages")
    still_serving(client)


@pytest.mark.parametrize("field, value", [("max_tokens", -5), ("temperature", -1), ("top_p", 0), ("n", 0),
                                          ("top_logprobs", 3), ("stop", [""]), ("presence_penalty", 3)])
def test_invalid_field_values_are_400_naming_the_field(server, client, field, value):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", **{**CHAT, field: value})
    error = caught.value.body
    assert caught.value.status_code == 400 and error["type"] == "invalid_request_error"
    assert field in error["message"] and error["param"] == field
    still_serving(client)


def test_unknown_model_is_404_model_not_found(server, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", **CHAT)
    assert caught.value.body["code"] == "model_not_found" and "tiny" in caught.value.body["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    still_serving(client)


def test_prompt_longer_than_the_session_is_400_and_nothing_leaks(server, client):
    long_text = "word " * (SESSION_LEN + 50)
    with pytest.raises(openai.BadRequestError, match="session_len"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": long_text}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="session_len"):
        client.completions.create(model="tiny", prompt=["hi", long_text], max_tokens=4)  # refused as a whole
    m = wait_idle(server)
    assert m["tidemind_kv_cache_blocks_free"] == m["tidemind_kv_cache_blocks_total"]
    still_serving(client)


def test_max_tokens_absent_is_the_session_on_chat_and_16_on_completions(server, client):
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Count to 500."}],
                                          temperature=0, extra_body={"ignore_eos": True})
    assert chat.choices[0].finish_reason == "length" and chat.usage.total_tokens == SESSION_LEN
    short = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0,
                                      extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 16  # OpenAI's and LMDeploy's default
    prompt = list(range(1000, 1000 + SESSION_LEN - 20))  # token ids
    answer = client.completions.create(model="tiny", prompt=prompt, temperature=0, max_tokens=200,
                                       extra_body={"ignore_eos": True})
    assert answer.choices[0].finish_reason == "length"  # more than the room left: the session ends it
    assert answer.usage.completion_tokens == 20 and answer.usage.total_tokens == SESSION_LEN


def post_raw(url: str, path: str, content: bytes) -> httpx.Response:
    return httpx.post(f"{url}{path}", content=content, headers={**AUTH, "Content-Type": "application/json"},
                      timeout=60)


_SURROGATE_BODIES = {  # "\\ud800" is valid JSON, but not a Unicode character
    "/v1/chat/completions": (b'{"messages": [{"role": "user", "content": "a\\ud800"}], "max_tokens": 2}', "messages"),
    "/v1/completions": (b'{"prompt": "\\ud800", "max_tokens": 2}', "prompt"),
    "/v1/encode": (b'{"input": ["ok", "\\udfff"]}', "input"),
    "/v1/chat/interactive": (b'{"prompt": "\\ud800", "request_output_len": 2}', "prompt"),
}


@pytest.mark.parametrize("path", list(_SURROGATE_BODIES))
def test_a_lone_surrogate_is_a_400_on_every_endpoint(server, client, path):
    content, param = _SURROGATE_BODIES[path]
    response = post_raw(server, path, content)
    assert "lone UTF-16 surrogate" in assert_openai_error(response, 400, param=param)
    assert response.headers["x-request-id"]
    still_serving(client)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "stream": "yes"}, "stream"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": "4"}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "n": "2"}, "n"),
    ("/v1/chat/interactive", {"prompt": "hi", "request_output_len": 2, "stream": "yes"}, "stream"),
    ("/v1/encode", {"input": "hi", "do_preprocess": "true"}, "do_preprocess"),
])
def test_a_known_field_of_the_wrong_type_is_a_400(server, path, body, param):
    response = httpx.post(f"{server}{path}", json=body, headers=AUTH)
    assert "Input should be a valid" in assert_openai_error(response, 400, param=param)


def test_a_wrong_method_is_a_405_naming_the_allowed_one(server):
    for method, path, allowed in [("GET", "/v1/chat/completions", "POST"), ("DELETE", "/v1/models", "GET")]:
        response = httpx.request(method, f"{server}{path}", headers=AUTH)
        assert f"use {allowed}" in assert_openai_error(response, 405)
        assert response.headers["allow"] == allowed


def test_models_lists_the_limits(server, client):
    card = httpx.get(f"{server}/v1/models", headers=AUTH).json()["data"][0]
    limits = card["tidemind"]["limits"]
    assert limits == {**limits, "max_tokens": SESSION_LEN - 1, "prompt_tokens": SESSION_LEN - 1, "n": 16,
                      "choices": 256, "logprobs": 20, "top_logprobs": 20, "stop_sequences": 32,
                      "stop_sequence_chars": 256, "request_bytes": MAX_REQUEST_BYTES}
    # the longest SmolLM2 token is a newline and 80 spaces
    assert card["max_model_len"] == SESSION_LEN and limits["prompt_chars"] == (SESSION_LEN - 1) * 81
    assert client.models.list().data[0].model_extra["tidemind"]["limits"] == limits


def test_a_body_over_the_size_limit_is_413_before_it_is_parsed(server, client):
    started = time.time()
    prefix, suffix = b'{"messages": [{"role": "user", "content": "', b'"}]}'
    whole = post_raw(server, "/v1/chat/completions", prefix + b"a" * 50_000_000 + suffix)
    assert "--max-request-bytes" in assert_openai_error(whole, 413, code="request_too_large")

    def chunked():  # no Content-Length: counted as it arrives
        yield prefix
        for _ in range(50):
            yield b"a" * 1_000_000
        yield suffix

    streamed = httpx.post(f"{server}/v1/completions", content=chunked(), timeout=60,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert_openai_error(streamed, 413, code="request_too_large")
    assert time.time() - started < 10
    still_serving(client)


@pytest.mark.parametrize("path, field, make", [
    ("/v1/chat/completions", "messages", lambda text: {"messages": [{"role": "user", "content": text}]}),
    ("/v1/completions", "prompt", lambda text: {"prompt": ["hi", text]}),
    ("/v1/encode", "input", lambda text: {"input": text}),
    ("/v1/chat/interactive", "prompt", lambda text: {"prompt": text, "session_id": 7, "interactive_mode": True}),
])
def test_a_prompt_over_the_character_bound_is_refused_before_tokenizing(server, client, path, field, make):
    limit = httpx.get(f"{server}/v1/models", headers=AUTH).json()["data"][0]["tidemind"]["limits"]["prompt_chars"]
    at_the_bound = httpx.post(f"{server}{path}", json={**make("a" * limit), "max_tokens": 2} if
                              path != "/v1/encode" else make("a" * limit), headers=AUTH)
    assert "characters" not in at_the_bound.text  # not refused for its characters (maybe for its tokens)
    started = time.time()
    # 7 MB: tokenizing it would take seconds
    response = httpx.post(f"{server}{path}", json=make("word " * 1_400_000), headers=AUTH, timeout=60)
    message = assert_openai_error(response, 400, param=field)
    assert f"at most {SESSION_LEN - 1} tokens" in message and f"({limit} characters" in message
    assert time.time() - started < 3
    still_serving(client)


def test_max_tokens_over_the_limit_is_a_400_naming_it(server, client):
    for body, param in [({**CHAT, "max_tokens": SESSION_LEN}, "max_tokens"),
                        ({**CHAT, "max_completion_tokens": 10**6}, "max_completion_tokens")]:
        response = httpx.post(f"{server}/v1/chat/completions", json=body, headers=AUTH)
        assert f"at most {SESSION_LEN - 1}" in assert_openai_error(response, 400, param=param)
    with pytest.raises(openai.BadRequestError, match="GET /v1/models"):
        client.completions.create(model="tiny", prompt="hi", max_tokens=SESSION_LEN)
    with pytest.raises(openai.BadRequestError, match="at most 16 choices"):
        client.chat.completions.create(model="tiny", n=17, **CHAT)
    with pytest.raises(openai.BadRequestError, match="at most 256 characters"):
        client.chat.completions.create(model="tiny", stop=["x" * 257], **CHAT)


def test_more_choices_than_the_limit_are_refused_before_any_runs(server, client):
    # A body of 200,000 one-letter prompts (1 MB) would be 200,000 engine requests, all submitted
    # from the event loop: the server would stop answering for seconds, its memory would grow by GBs.
    started = time.time()
    with pytest.raises(openai.BadRequestError,
                       match=r"200000 prompts x 1 samples \(n or best_of\) are 200000 choices, more than 256"):
        client.completions.create(model="tiny", prompt=["a"] * 200_000, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="17 prompts x 16 samples") as caught:
        client.completions.create(model="tiny", prompt=[[1, 2]] * 17, n=16, max_tokens=1)
    assert caught.value.body["param"] == "prompt" and "GET /v1/models" in caught.value.body["message"]
    assert time.time() - started < 10
    assert len(client.completions.create(model="tiny", prompt=[[1, 2]] * 16, n=16, max_tokens=1).choices) == 256
    m = wait_idle(server)
    assert m["tidemind_kv_cache_blocks_free"] == m["tidemind_kv_cache_blocks_total"]


# ---------------------------------------------------------------------- keys and limits
def test_api_keys(server, client):
    body = {"model": "tiny", **CHAT}
    missing = httpx.post(f"{server}/v1/chat/completions", json=body)
    assert "missing API key" in assert_openai_error(missing, 401, code="invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert httpx.get(f"{server}/v1/models").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200
    assert httpx.get(f"{server}/metrics").status_code == 200
    assert httpx.post(f"{server}/v1/chat/completions", json=body, headers=AUTH).status_code == 200
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_over_the_concurrency_limit_is_429_at_once(server, client):
    wait_idle(server)
    rejected_before = metrics(server)["tidemind_http_requests_rejected_total"]
    stream = client.chat.completions.create(model="tiny", stream=True, **{**CHAT, "max_tokens": 60},
                                            extra_body={"ignore_eos": True})
    next(stream)
    started = time.time()
    with pytest.raises(openai.RateLimitError) as caught:
        client.completions.create(model="tiny", prompt="hi", max_tokens=2)
    assert time.time() - started < 2.0 and caught.value.body["code"] == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "1"
    busy = httpx.post(f"{server}/v1/chat/interactive", json={"prompt": "hi", "session_id": 3,
                                                             "interactive_mode": True}, headers=AUTH)
    assert_openai_error(busy, 429)
    rest = list(stream)
    assert rest[-1].choices[0].finish_reason == "length"  # the running stream was not disturbed
    m = wait_idle(server)
    assert m["tidemind_http_requests_rejected_total"] == rejected_before + 2
    still_serving(client)


def test_cors_and_a_proxy_that_is_down(server, server_log):
    preflight = httpx.options(f"{server}/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == ORIGIN
    refused = httpx.get(f"{server}/v1/models", headers={"Origin": ORIGIN})  # no key: 401, still readable
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == ORIGIN
    assert "access-control-allow-origin" not in httpx.get(f"{server}/health", headers={"Origin": "http://evil"}).headers
    # the server started although its --proxy-url does not answer, and said so
    with open(server_log) as f:
        log = f.read()
    assert "could not register" in log and "POST /nodes/add" in log


# ---------------------------------------------------------------------- schemathesis
_LENGTH_FIELDS = {"/v1/chat/completions": ("max_tokens", "max_completion_tokens"),
                  "/v1/completions": ("max_tokens",), "/v1/chat/interactive": ("request_output_len", "max_tokens")}


def _keep_short(path: str, body, negative: bool) -> None:
    """Generated requests answer with at most 2 tokens, 2 choices: the check is about status codes,
    and an absent max_tokens would mean up to the session length. Invalid (negative) requests are
    only given a max_tokens when they have none: capping their values could make them valid."""
    if not isinstance(body, dict) or path not in _LENGTH_FIELDS:
        return
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for key, cap in [(k, 2) for k in _LENGTH_FIELDS[path]] + [("n", 2), ("min_new_tokens", 2)]:
        if not negative and numeric(body.get(key)) and body[key] > cap:
            body[key] = cap
    if not any(key in body for key in _LENGTH_FIELDS[path]):
        body[_LENGTH_FIELDS[path][0]] = 2


def test_schemathesis_finds_no_server_error_and_no_invalid_request_accepted(server, client):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import (content_type_conformance, negative_data_rejection, not_a_server_error,
                                     response_schema_conformance, status_code_conformance)

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/chat/interactive",
                                             "/v1/encode", "/v1/models", "/health", "/metrics"}
    assert "422" not in str(httpx.get(f"{server}/openapi.json").json()["paths"])  # invalid bodies are 400s
    checks = [not_a_server_error, negative_data_rejection, status_code_conformance, content_type_conformance,
              response_schema_conformance]
    deadline = time.time() + 150
    modes = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
    # GET operations take no input: nothing to make invalid
    cases = [(op, mode) for op in operations for mode in modes if op.method.upper() == "POST" or mode == modes[0]]
    for operation, mode in cases:
        @given(case=operation.as_strategy(mode))
        @settings(max_examples=10, deadline=None, database=None, derandomize=True,
                  phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        def check(case):
            _keep_short(operation.path, case.body, mode == modes[1])
            response = case.call(headers=AUTH, timeout=60)
            case.validate_response(response, checks=checks)

        check()
        assert time.time() < deadline, "the schemathesis run is too slow: lower max_examples"
    m = wait_idle(server, timeout=20)
    assert m["tidemind_kv_cache_blocks_free"] + m["tidemind_kv_cache_blocks_idle_sessions"] == \
        m["tidemind_kv_cache_blocks_total"]
    still_serving(client)
