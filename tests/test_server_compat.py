"""`tidemind serve api_server` (bundled SmolLM2) against what real clients send: LMDeploy's APIClient
0.17.0 and 0.3.0, guidellm's streaming requests and LangChain's ChatOpenAI (request bodies recorded in
tests/fixtures/clients/), structured output over a set of schemas, tool calls (forced by the grammar,
streamed whole), completions' echo with prompt log-probabilities, best_of, logit_bias, LMDeploy's and
vLLM's sampling fields, the 16-token completions default and GET /v1/models/{model}. A second server
(--strict-fields, a 128-token session) refuses unknown fields and shows chat's default length."""
from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import jsonschema
import pytest

from serve_fixtures import api_server

pytestmark = pytest.mark.slow

CLIENTS = Path(__file__).parent / "fixtures" / "clients"
MODEL = "smol"


@pytest.fixture(scope="module")
def server_log(tmp_path_factory):
    return tmp_path_factory.mktemp("compat") / "api_server.log"


@pytest.fixture(scope="module")
def server(server_log):
    with api_server("--session-len", "1024", "--model-name", MODEL, log_path=str(server_log)) as url:
        yield url


def recorded(name: str):
    return json.loads((CLIENTS / name).read_text())["requests"]


def send(url: str, request: dict) -> httpx.Response:
    body = {**request["body"], **({"model": MODEL} if "model" in request["body"] else {})}
    return httpx.post(f"{url}{request['path']}", json=body, timeout=300)


def sse_chunks(response: httpx.Response) -> list:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]", response.text[-500:]
    return [json.loads(line) for line in lines[:-1]]


# ---------------------------------------------------------------------------------------- LMDeploy
@pytest.mark.parametrize("fixture", ["lmdeploy_0.17.0.json", "lmdeploy_0.3.0.json"])
def test_lmdeploy_api_client_requests_are_answered(server, fixture):
    history_tokens = []
    for request in recorded(fixture):
        response = send(server, request)
        assert response.status_code == 200, (request["method"], response.text)
        if request["path"] == "/v1/chat/interactive":
            lines = [json.loads(line) for line in response.text.splitlines() if line.strip()]
            assert all({"text", "tokens", "finish_reason"} <= set(line) for line in lines)
            if request["body"]["prompt"]:
                history_tokens.append(lines[-1]["history_tokens"])
        elif request["stream"]:
            chunks = sse_chunks(response)
            assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        else:
            choice = response.json()["choices"][0]
            assert isinstance(choice.get("text", choice.get("message", {}).get("content")), str)
            if request["path"] == "/v1/completions":  # max_tokens: 16, LMDeploy's own default
                assert response.json()["usage"]["completion_tokens"] <= 16
    if history_tokens:  # 0.3's chat_interactive_v1: the second turn reuses the session's KV
        assert history_tokens[0] == 0 and history_tokens[1] > 0


# ---------------------------------------------------------------------------------------- guidellm
@pytest.mark.parametrize("request_", recorded("guidellm_0.8.1.json"), ids=lambda r: r["method"])
def test_guidellm_streams_carry_usage_in_every_chunk(server, request_):
    response = send(server, request_)
    assert response.status_code == 200, response.text
    chunks = sse_chunks(response)
    max_tokens = request_["body"].get("max_tokens") or request_["body"]["max_completion_tokens"]
    assert all(chunk["usage"] is not None for chunk in chunks)  # continuous_usage_stats
    counts = [chunk["usage"]["completion_tokens"] for chunk in chunks]
    assert counts == sorted(counts) and counts[-1] == max_tokens  # ignore_eos: exactly max tokens
    assert chunks[-1]["choices"] == [] and chunks[-2]["choices"][0]["finish_reason"] == "length"


# ---------------------------------------------------------------------------------------- LangChain
def _tool_schema(body: dict, name: str) -> dict:
    return next(t["function"]["parameters"] for t in body["tools"] if t["function"]["name"] == name)


@pytest.mark.parametrize("request_", recorded("langchain_openai_1.7.4.json"), ids=lambda r: r["method"])
def test_langchain_request_shapes_get_answers_langchain_can_use(server, request_):
    body = {**request_["body"], "model": MODEL, "max_tokens": 250, "temperature": 0}
    response = httpx.post(f"{server}{request_['path']}", json=body, timeout=300)
    assert response.status_code == 200, response.text
    if body["stream"]:
        chunks = sse_chunks(response)
        calls = [c for chunk in chunks for choice in chunk["choices"] for c in choice["delta"].get("tool_calls") or []]
        assert calls and chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
        for call in calls:
            jsonschema.validate(json.loads(call["function"]["arguments"]), _tool_schema(body, call["function"]["name"]))
        return
    message = response.json()["choices"][0]["message"]
    forced = body.get("tool_choice") not in (None, "auto", "none")
    for call in message.get("tool_calls") or []:  # every call's arguments: valid JSON for its function
        jsonschema.validate(json.loads(call["function"]["arguments"]), _tool_schema(body, call["function"]["name"]))
    if forced:
        assert message["tool_calls"] and response.json()["choices"][0]["finish_reason"] == "tool_calls"
        if isinstance(body["tool_choice"], dict):
            assert {c["function"]["name"] for c in message["tool_calls"]} == {body["tool_choice"]["function"]["name"]}
        if body.get("parallel_tool_calls") is False:
            assert len(message["tool_calls"]) == 1
    form = body.get("response_format") or {}
    if form.get("type") == "json_schema":
        jsonschema.validate(json.loads(message["content"]), form["json_schema"]["schema"])
    elif form.get("type") == "json_object":
        assert isinstance(json.loads(message["content"]), dict)


def test_langchain_itself_binds_tools_and_gets_structured_output(server):
    """LangChain itself (the test extra installs it; where it is absent, the recorded shapes above stand in)."""
    langchain_openai = pytest.importorskip("langchain_openai")
    from pydantic import BaseModel, Field

    class City(BaseModel):
        """A city."""

        name: str = Field(description="the city's name", max_length=40)
        country: str = Field(description="its country", max_length=40)

    def get_weather(city: str) -> str:
        """Get the current weather of a city."""
        return "sunny"

    llm = langchain_openai.ChatOpenAI(model=MODEL, base_url=f"{server}/v1", api_key="none", temperature=0,
                                      max_tokens=120, max_retries=0)
    answer = llm.bind_tools([get_weather], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert answer.tool_calls and answer.tool_calls[0]["name"] == "get_weather"
    assert isinstance(answer.tool_calls[0]["args"]["city"], str)
    question = "Name a city in Japan, as JSON with name and country."
    for method in ("json_schema", "function_calling"):  # the schema is enforced: always a City
        assert isinstance(llm.with_structured_output(City, method=method).invoke(question), City)
    # json_mode promises JSON, not the schema: what the model puts in it is its own business
    raw = llm.with_structured_output(City, method="json_mode", include_raw=True).invoke(question)["raw"]
    assert isinstance(json.loads(raw.content), dict)


def test_litellm_itself_chats_streams_calls_tools_and_gets_structured_output(server, monkeypatch):
    """litellm's openai/ provider (not in the test extra: 22 more packages, boto3 and aiohttp among them;
    skipped where it is absent)."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download of its price list
    litellm = pytest.importorskip("litellm")
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=30)
        country: str = Field(max_length=30)

    common = dict(model=f"openai/{MODEL}", api_base=f"{server}/v1", api_key="none", temperature=0, max_tokens=60)
    hello = [{"role": "user", "content": "Say hi."}]
    whole = litellm.completion(messages=hello, **common).choices[0].message.content
    streamed = [chunk.choices[0].delta.content or "" for chunk in litellm.completion(messages=hello, stream=True,
                                                                                     **common)]
    assert whole and "".join(streamed) == whole
    called = litellm.completion(messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS[:1],
                                tool_choice="required", **{**common, "max_tokens": 120}).choices[0]
    assert called.finish_reason == "tool_calls" and called.message.tool_calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(called.message.tool_calls[0].function.arguments), TOOLS[0]["function"]["parameters"])
    city = litellm.completion(messages=[{"role": "user", "content": "A city in Japan, as JSON."}], response_format=City,
                              **{**common, "max_tokens": 100}).choices[0].message.content
    City.model_validate_json(city)


def test_the_openai_sdk_parses_structured_output_retrieves_the_model_and_gets_tool_calls(server):
    import openai
    from pydantic import BaseModel, Field

    class Trip(BaseModel):
        city: str = Field(max_length=30)
        days: int = Field(ge=1, le=30)

    client = openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0)
    parsed = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Plan a trip."}],
                                           response_format=Trip, max_tokens=100, temperature=0)
    assert isinstance(parsed.choices[0].message.parsed, Trip)
    called = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Add 2 and 3."}],
                                            tools=TOOLS, tool_choice="required", max_tokens=250, temperature=0)
    assert called.choices[0].finish_reason == "tool_calls"
    assert {c.function.name for c in called.choices[0].message.tool_calls} <= {"add", "get_weather"}
    assert client.models.retrieve(MODEL).id == MODEL


# ---------------------------------------------------------------------------------------- structured output
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer",
                                                                                         "minimum": 0, "maximum": 130}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                                 "minItems": 1, "maxItems": 3}}, "required": ["colors"]},
    {"type": "object", "properties": {"city": {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 30}, "population": {"type": "integer", "minimum": 0,
                                                                     "maximum": 10**9}},
        "required": ["name", "population"], "additionalProperties": False}, "capital": {"type": "boolean"}},
     "required": ["city", "capital"], "additionalProperties": False},
    {"type": "object", "properties": {"answer": {"anyOf": [{"type": "number", "minimum": -1e6, "maximum": 1e6},
                                                           {"type": "null"}]},
                                      "unit": {"type": "string", "pattern": "^[a-z]{1,5}$"}},
     "required": ["answer", "unit"], "additionalProperties": False},
    {"type": "array", "items": {"type": "string", "maxLength": 20}, "minItems": 2, "maxItems": 4},
]
# Strings and numbers are bounded: sampling at temperature 1 could otherwise run a string or a number
# to max_tokens (the answer then ends with finish_reason "length", as any answer would).
PROMPTS = ["Describe a person.", "Pick some colors.", "Tell me about Paris.", "How tall is Everest?",
           "List some fruits."]


@pytest.mark.parametrize("schema, prompt", list(zip(SCHEMAS, PROMPTS)))
@pytest.mark.parametrize("spelling", ["response_format", "guided_json"])
def test_structured_answers_always_parse_and_validate(server, schema, prompt, spelling):
    fields = ({"response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema,
                                                                        "strict": True}}}
              if spelling == "response_format" else {"guided_json": schema})
    for temperature, seed in ((0, None), (1.0, 3)):
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 200, "temperature": temperature,
                "seed": seed, **fields}
        answer = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300).json()
        assert answer["choices"][0]["finish_reason"] == "stop", answer
        jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), schema)


def test_regex_choice_grammar_and_json_object(server):
    def ask(**fields):
        body = {"messages": [{"role": "user", "content": "Answer."}], "max_tokens": 60, "temperature": 0, **fields}
        answer = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300).json()
        return answer["choices"][0]["message"]["content"]

    assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", ask(guided_regex=r"[0-9]{4}-[0-9]{2}-[0-9]{2}"))
    assert ask(guided_choice=["alpha", "beta"]) in ("alpha", "beta")
    assert ask(response_format={"type": "regex_schema", "regex_schema": "(yes|no)"}) in ("yes", "no")
    assert re.fullmatch(r"go(!)+", ask(guided_grammar='start: "go" "!"+'))
    assert isinstance(json.loads(ask(response_format={"type": "json_object"})), dict)
    completion = httpx.post(f"{server}/v1/completions", json={"prompt": "Q: 2+2? A:", "guided_choice": ["4", "5"],
                                                              "max_tokens": 4}, timeout=300).json()
    assert completion["choices"][0]["text"] in ("4", "5")
    bad = httpx.post(f"{server}/v1/chat/completions", json={"messages": "x", "guided_regex": "a("})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "guided_regex"


# ---------------------------------------------------------------------------------------- tools
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 40}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
             "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
             "required": ["a", "b"], "additionalProperties": False}}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_streamed_and_not_are_valid_calls(server, choice):
    body = {"messages": [{"role": "user", "content": "What is 2 plus 3?"}], "tools": TOOLS, "tool_choice": choice,
            "max_tokens": 250, "temperature": 0}
    whole = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300).json()["choices"][0]
    streamed = sse_chunks(httpx.post(f"{server}/v1/chat/completions", json={**body, "stream": True}, timeout=300))
    deltas = [c for chunk in streamed for c in chunk["choices"][0]["delta"].get("tool_calls") or []]
    assert whole["finish_reason"] == streamed[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole["message"]["tool_calls"]] == \
        [(d["function"]["name"], d["function"]["arguments"]) for d in deltas]
    assert [d["index"] for d in deltas] == list(range(len(deltas)))
    for call in deltas:
        schema = next(t["function"]["parameters"] for t in TOOLS if t["function"]["name"] == call["function"]["name"])
        jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    if isinstance(choice, dict):
        assert {d["function"]["name"] for d in deltas} == {"add"} and len(deltas) == 1


def test_a_tool_result_conversation_and_tool_choice_none(server):
    messages = [{"role": "user", "content": "What is the weather in Oslo?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                      "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    for choice in ("auto", "none"):
        answer = httpx.post(f"{server}/v1/chat/completions", json={"messages": messages, "tools": TOOLS,
                                                                   "tool_choice": choice, "max_tokens": 40,
                                                                   "temperature": 0}, timeout=300)
        assert answer.status_code == 200, answer.text
        if choice == "none":
            assert "tool_calls" not in answer.json()["choices"][0]["message"]


# ---------------------------------------------------------------------------------------- the rest of the surface
def test_completions_default_to_16_tokens(server):
    completion = httpx.post(f"{server}/v1/completions", json={"prompt": "Once upon a time", "ignore_eos": True},
                            timeout=300).json()
    assert completion["usage"]["completion_tokens"] == 16 and completion["choices"][0]["finish_reason"] == "length"


def test_echo_gives_the_prompts_log_probabilities(server):
    prompt = "The capital of France is Paris"
    scored = httpx.post(f"{server}/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 2,
                                                          "max_tokens": 0}, timeout=300).json()["choices"][0]
    assert scored["text"] == prompt
    logprobs = scored["logprobs"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert "".join(logprobs["tokens"]) == prompt and len(logprobs["text_offset"]) == len(logprobs["tokens"])
    ids = httpx.post(f"{server}/v1/encode", json={"input": prompt}).json()["input_ids"]
    # The prefill's log-probability of the last prompt token equals the decode step's log-probability of
    # choosing it after the rest of the prompt (forced with logit_bias; logprobs are those of the raw logits).
    forced = httpx.post(f"{server}/v1/completions", json={"prompt": ids[:-1], "max_tokens": 1, "logprobs": 0,
                                                          "logit_bias": {str(ids[-1]): 100}}, timeout=300).json()
    assert forced["choices"][0]["logprobs"]["token_logprobs"][0] == pytest.approx(logprobs["token_logprobs"][-1],
                                                                                   abs=1e-3)
    streamed = sse_chunks(httpx.post(f"{server}/v1/completions", json={"prompt": prompt, "echo": True, "logprobs": 1,
                                                                       "max_tokens": 3, "stream": True}, timeout=300))
    assert streamed[0]["choices"][0]["text"] == prompt
    assert streamed[0]["choices"][0]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        logprobs["token_logprobs"][1:], abs=1e-4)


def test_best_of_returns_the_samples_with_the_best_mean_log_probability(server):
    common = {"prompt": "My favourite animal is", "max_tokens": 6, "seed": 11, "temperature": 1.0, "logprobs": 0}
    all_three = httpx.post(f"{server}/v1/completions", json={**common, "n": 3}, timeout=300).json()["choices"]
    mean = lambda c: sum(c["logprobs"]["token_logprobs"]) / len(c["logprobs"]["token_logprobs"])  # noqa: E731
    best = httpx.post(f"{server}/v1/completions", json={**common, "n": 1, "best_of": 3}, timeout=300).json()
    assert best["choices"][0]["text"] == max(all_three, key=mean)["text"]
    bad = httpx.post(f"{server}/v1/completions", json={**common, "best_of": 2, "n": 3})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "best_of"
    nothing = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "max_tokens": 0})
    assert nothing.status_code == 400 and "echo" in nothing.json()["error"]["message"]


def test_logit_bias_bans_and_forces_tokens(server):
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 1, "temperature": 0,
            "logprobs": True}
    first = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300).json()["choices"][0]
    token = first["logprobs"]["content"][0]["token"]
    token_id = httpx.post(f"{server}/v1/encode", json={"input": token, "add_bos": False}).json()["input_ids"][0]
    banned = httpx.post(f"{server}/v1/chat/completions", json={**body, "logit_bias": {str(token_id): -100}},
                        timeout=300).json()["choices"][0]
    assert banned["logprobs"]["content"][0]["token"] != token


def test_lmdeploy_and_vllm_sampling_fields_are_honoured(server):
    """min_tokens, stop_token_ids, include_stop_str_in_output, bad_words and chat's echo, each against the
    plain greedy answer to the same question."""
    def chat(messages=None, **fields):
        body = {"messages": messages or [{"role": "user", "content": "Name a fruit."}], "temperature": 0,
                "max_tokens": 24, **fields}
        answer = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300).json()
        return answer["choices"][0], answer["usage"]["completion_tokens"]

    plain, count = chat(logprobs=True)
    tokens = [entry["token"] for entry in plain["logprobs"]["content"]]
    assert plain["finish_reason"] == "stop" and count >= 3, plain  # the checks below need a short answer
    longer, longer_count = chat(min_tokens=count + 4, max_tokens=count + 4)  # the end of the answer is banned
    assert longer_count == count + 4 and longer["message"]["content"].startswith(plain["message"]["content"])
    second = httpx.post(f"{server}/v1/encode", json={"input": tokens[1], "add_bos": False}).json()["input_ids"]
    assert len(second) == 1
    cut, cut_count = chat(stop_token_ids=second)
    assert cut["finish_reason"] == "stop" and cut_count == 2 and cut["message"]["content"].strip() == tokens[0].strip()
    word = tokens[1].strip()
    without, _ = chat(stop=[word])
    with_stop, _ = chat(stop=[word], include_stop_str_in_output=True)
    assert word not in without["message"]["content"]
    assert with_stop["message"]["content"] == without["message"]["content"] + word
    banned, _ = chat(bad_words=[tokens[0].strip()])
    assert not banned["message"]["content"].startswith(tokens[0].strip())
    started = [{"role": "user", "content": "Name a fruit."}, {"role": "assistant", "content": "My favourite fruit is"}]
    continued, _ = chat(started)
    echoed, _ = chat(started, echo=True)
    assert echoed["message"]["content"] == "My favourite fruit is" + continued["message"]["content"]


def test_models_by_name(server):
    assert httpx.get(f"{server}/v1/models/{MODEL}").json()["id"] == MODEL
    missing = httpx.get(f"{server}/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_unknown_fields_are_logged_once_per_name(server, server_log):
    body = {"messages": "hi", "max_tokens": 2, "frobnicate_xyz": 1, "empty_one": {}}
    for _ in range(2):
        assert httpx.post(f"{server}/v1/chat/completions", json=body, timeout=300).status_code == 200
    log = Path(server_log).read_text()
    assert log.count("'frobnicate_xyz' is not known") == 1 and "empty_one" not in log


SHORT_SESSION = 128


@pytest.fixture(scope="module")
def strict_short_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("strict") / "strict.log"
    with api_server("--session-len", str(SHORT_SESSION), "--strict-fields", "--model-name", MODEL,
                    log_path=str(log)) as url:
        yield url


def test_strict_fields_refuse_unknown_fields_with_a_value(strict_short_server):
    url = strict_short_server
    refused = httpx.post(f"{url}/v1/chat/completions", json={"messages": "hi", "max_tokens": 2, "frobnicate": 1})
    assert refused.status_code == 400 and "frobnicate" in refused.json()["error"]["message"]
    for request in recorded("lmdeploy_0.17.0.json")[:1]:
        assert send(url, request).status_code == 200  # its only unknown field is an empty one


def test_chat_without_max_tokens_runs_to_the_end_of_the_session(strict_short_server):
    """Chat's default, as LMDeploy's: no max_tokens means the rest of the session (not 16, as on completions)."""
    body = {"messages": [{"role": "user", "content": "Count from one to a thousand."}], "ignore_eos": True}
    answer = httpx.post(f"{strict_short_server}/v1/chat/completions", json=body, timeout=300).json()
    usage = answer["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == SHORT_SESSION, usage
    assert usage["completion_tokens"] > 16 and answer["choices"][0]["finish_reason"] == "length"
