"""Bad requests to `tidemind serve api_server` get the right status and OpenAI's error body, and
nothing else is lost: API keys, the in-flight limit, the session length, and a schemathesis run
over the server's own OpenAPI schema that must find no 5xx."""
from __future__ import annotations

import time

import httpx
import openai
import pytest

from serve_fixtures import api_server, free_port, metrics

pytestmark = pytest.mark.slow

SESSION_LEN = 256
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
                    log_path=server_log) as url:
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
    assert "unknown field 'frobnicate'" in assert_openai_error(post(b'{"frobnicate": 1, "messages": []}'), 400)
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


def test_default_max_tokens_runs_up_to_the_session_length(server, client):
    prompt = list(range(1000, 1000 + SESSION_LEN - 20))  # token ids
    answer = client.completions.create(model="tiny", prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 20 and answer.usage.total_tokens == SESSION_LEN


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


def _keep_short(path: str, body) -> None:
    """Generated requests answer with at most 2 tokens, 2 choices: the check is about status codes,
    and an absent max_tokens would mean up to the session length."""
    if not isinstance(body, dict) or path not in _LENGTH_FIELDS:
        return
    numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    for key, cap in [(k, 2) for k in _LENGTH_FIELDS[path]] + [("n", 2), ("min_new_tokens", 2)]:
        if numeric(body.get(key)) and body[key] > cap:
            body[key] = cap
    if not any(key in body for key in _LENGTH_FIELDS[path]):
        body[_LENGTH_FIELDS[path][0]] = 2


def test_schemathesis_finds_no_server_error(server, client):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/chat/completions", "/v1/completions", "/v1/chat/interactive",
                                             "/v1/encode", "/v1/models", "/health", "/metrics"}
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
            _keep_short(operation.path, case.body)
            response = case.call(headers=AUTH, timeout=60)
            case.validate_response(response, checks=[not_a_server_error])

        check()
        assert time.time() < deadline, "the schemathesis run is too slow: lower max_examples"
    m = wait_idle(server, timeout=20)
    assert m["tidemind_kv_cache_blocks_free"] + m["tidemind_kv_cache_blocks_idle_sessions"] == \
        m["tidemind_kv_cache_blocks_total"]
    still_serving(client)
