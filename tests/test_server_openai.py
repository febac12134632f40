"""`tidemind serve api_server` on the bundled SmolLM2, through the official openai client: chat and
completions (streaming and not), stop, n, seeds, logprobs, usage, greedy text equal to pipeline()'s,
32 concurrent streams, a client that leaves mid-stream, and the side endpoints."""
from __future__ import annotations

import asyncio
import math
import re
import threading
import time

import httpx
import openai
import pytest

from hf_reference import bench_prompts
from serve_fixtures import api_server, metrics
from tidemind import EngineConfig, GenerationConfig, pipeline
from tidemind.loader import resolve_model

pytestmark = pytest.mark.slow

SESSION_LEN = 1024


@pytest.fixture(scope="module", params=["--no-engine-process", "--engine-process"])
def server_and_pipe(tmp_path_factory, request):
    """The server (its engine in a thread of the server, then in a process of its own), and a
    pipeline in this process to compare with; loaded side by side."""
    log = str(tmp_path_factory.mktemp("server") / "api_server.log")
    resolve_model(None)  # with a fresh cache, convert the GGUF once here rather than in both loaders
    loaded = {}

    def load():
        try:
            loaded["pipe"] = pipeline(backend_config=EngineConfig(dtype="float32", device="cpu",
                                                                  session_len=SESSION_LEN, max_batch_size=32))
        except BaseException as exc:  # re-raised in the test thread
            loaded["error"] = exc

    loader = threading.Thread(target=load)
    loader.start()
    try:
        with api_server("--session-len", str(SESSION_LEN), request.param, log_path=log) as url:
            loader.join()
            if "error" in loaded:
                raise loaded["error"]
            yield url, loaded["pipe"], log
    finally:
        loader.join()
        if "pipe" in loaded:
            loaded["pipe"].close()


@pytest.fixture(scope="module")
def server(server_and_pipe):
    return server_and_pipe[0]


@pytest.fixture(scope="module")
def pipe(server_and_pipe):
    return server_and_pipe[1]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def wait_for_all_blocks_free(url: str, timeout: float = 10.0) -> dict:
    deadline = time.time() + timeout
    while True:
        m = metrics(url)
        if m["tidemind_kv_cache_blocks_free"] == m["tidemind_kv_cache_blocks_total"] or time.time() > deadline:
            return m
        time.sleep(0.1)


def chat(client, model, prompt, **kw):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], **kw)


def engine_text(pipe, prompt_ids, max_new_tokens: int) -> str:
    """Greedy text of raw token ids through the test process's own engine (no chat template)."""
    outputs = pipe.async_engine.stream(prompt_ids, GenerationConfig(max_new_tokens=max_new_tokens))
    return "".join(out.new_text for out in outputs)


# ---------------------------------------------------------------------- side endpoints
def test_models_health_encode_and_metrics(server, server_and_pipe, pipe, model):
    assert model == "smollm2-135m"
    with open(server_and_pipe[2]) as f:
        log = f.read()  # the start-up log shows the URL and the KV budget at the default log level
    assert re.search(rf"INFO tidemind: serving smollm2-135m at {server} \(KV cache: \d+ blocks x 64 tokens\)", log)
    assert re.search(r"INFO tidemind(\[engine\])?: KV cache: \d+ blocks x 64 tokens", log)
    cards = httpx.get(f"{server}/v1/models").json()
    assert cards["object"] == "list" and cards["data"][0]["max_model_len"] == SESSION_LEN
    assert httpx.get(f"{server}/health").status_code == 200
    prompt = "What is the capital of France?"
    templated = httpx.post(f"{server}/v1/encode", json={"input": prompt, "do_preprocess": True}).json()
    assert templated == {"input_ids": pipe.encode_prompt(prompt), "length": len(pipe.encode_prompt(prompt))}
    raw = httpx.post(f"{server}/v1/encode", json={"input": [prompt, "hi"], "add_bos": False}).json()
    assert raw["input_ids"] == [pipe.tokenizer.encode(p, add_bos=False) for p in (prompt, "hi")]
    assert raw["length"] == [len(ids) for ids in raw["input_ids"]]
    response = httpx.get(f"{server}/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    m = metrics(server)
    for name in ("tidemind_num_requests_running", "tidemind_num_requests_waiting", "tidemind_kv_cache_usage_ratio",
                 "tidemind_prompt_tokens_total", "tidemind_generation_tokens_total",
                 "tidemind_time_to_first_token_seconds_count", "tidemind_time_per_output_token_seconds_count",
                 "tidemind_e2e_request_latency_seconds_count", "tidemind_requests_total{finish_reason=stop}"):
        assert name in m, name
    assert 0 <= m["tidemind_kv_cache_usage_ratio"] <= 1


# ---------------------------------------------------------------------- chat
def test_chat_greedy_equals_pipeline_with_exact_usage_and_metrics(server, client, model, pipe):
    prompts = bench_prompts()[:2]
    before = metrics(server)
    usages = []
    for prompt, expected in zip(prompts, pipe(prompts, GenerationConfig(max_new_tokens=24))):
        got = chat(client, model, prompt, temperature=0, max_tokens=24)
        choice = got.choices[0]
        assert (choice.message.content, choice.finish_reason) == (expected.text, expected.finish_reason)
        assert choice.message.role == "assistant" and choice.index == 0
        assert got.usage.prompt_tokens == len(pipe.encode_prompt(prompt)) == expected.input_token_len
        assert got.usage.completion_tokens == expected.generate_token_len
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        usages.append(got.usage)
    after = metrics(server)
    delta = lambda name: after[name] - before[name]
    assert delta("tidemind_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert delta("tidemind_generation_tokens_total") == sum(u.completion_tokens for u in usages)
    for name in ("tidemind_time_to_first_token_seconds_count", "tidemind_time_per_output_token_seconds_count",
                 "tidemind_e2e_request_latency_seconds_count"):
        assert delta(name) == 2, name
    finished = [delta(f"tidemind_requests_total{{finish_reason={reason}}}") for reason in ("stop", "length")]
    assert sum(finished) == 2


def test_chat_stream_matches_non_stream_and_reports_usage(client, model):
    prompt = bench_prompts()[1]
    whole = chat(client, model, prompt, temperature=0, max_completion_tokens=16)
    chunks = list(chat(client, model, prompt, temperature=0, max_completion_tokens=16, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == whole.usage.model_dump()
    # the message may also be a list of text parts
    parts = client.chat.completions.create(model=model, temperature=0, max_tokens=16, messages=[
        {"role": "user", "content": [{"type": "text", "text": prompt}]}])
    assert parts.choices[0].message.content == whole.choices[0].message.content


def test_stop_strings_end_the_answer_before_them(client, model):
    # (a single string as `stop`: see the completions test)
    prompt = bench_prompts()[1]
    full = chat(client, model, prompt, temperature=0, max_tokens=24).choices[0].message.content
    word = full.split()[len(full.split()) // 2]
    cut = chat(client, model, prompt, temperature=0, max_tokens=24, stop=[word, "zzzz-not-there"]).choices[0]
    assert cut.finish_reason == "stop" and cut.message.content == full[:full.index(word)]


def test_n_choices_seeds_and_prompt_counted_once(client, model, pipe):
    prompt = bench_prompts()[2]
    kw = dict(temperature=1.0, top_p=0.95, max_tokens=8)
    first = chat(client, model, prompt, n=2, seed=1234, extra_body={"ignore_eos": True}, **kw)
    assert [c.index for c in first.choices] == [0, 1]
    assert first.usage.prompt_tokens == len(pipe.encode_prompt(prompt))
    assert first.usage.completion_tokens == 2 * 8
    again = chat(client, model, prompt, n=2, seed=1234, extra_body={"ignore_eos": True}, **kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in first.choices]
    # choice i is sampled with seed + i
    shifted = chat(client, model, prompt, n=1, seed=1235, extra_body={"ignore_eos": True}, **kw)
    assert shifted.choices[0].message.content == first.choices[1].message.content
    other = chat(client, model, prompt, n=2, seed=99, extra_body={"ignore_eos": True}, **kw)
    assert [c.message.content for c in other.choices] != [c.message.content for c in first.choices]


def test_chat_logprobs_are_sorted_log_probabilities_of_the_chosen_tokens(client, model):
    got = chat(client, model, bench_prompts()[0], temperature=0, max_tokens=12, logprobs=True, top_logprobs=3)
    content = got.choices[0].logprobs.content
    assert len(content) == got.usage.completion_tokens
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert all(v <= 0 for v in tops) and sum(math.exp(v) for v in tops) <= 1 + 1e-4
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token and entry.logprob == pytest.approx(tops[0])
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


# ---------------------------------------------------------------------- completions
def test_completions_take_text_and_token_ids_and_match_the_engine(client, model, pipe):
    texts = ["The capital of France is", "Once upon a time"]
    ids = [pipe.tokenizer.encode(t) for t in texts]
    expected = [engine_text(pipe, i, 12) for i in ids]
    for prompt in (texts, ids):
        got = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=12)
        assert [c.text for c in got.choices] == expected and [c.index for c in got.choices] == [0, 1]
        assert got.usage.prompt_tokens == sum(len(i) for i in ids)
    single = client.completions.create(model=model, prompt=ids[0], temperature=0, max_tokens=12)
    assert single.choices[0].text == expected[0] and single.choices[0].finish_reason == "length"
    stream = client.completions.create(model=model, prompt=texts[0], temperature=0, max_tokens=12, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected[0]
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == len(ids[0])
    cut = client.completions.create(model=model, prompt=texts[1], temperature=0, max_tokens=12,
                                    stop=expected[1].split()[2])
    assert cut.choices[0].text == expected[1][:expected[1].index(expected[1].split()[2])]


def test_completion_logprobs(client, model):
    got = client.completions.create(model=model, prompt="The capital of France is", temperature=0, max_tokens=8,
                                    logprobs=2)
    lp = got.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == got.usage.completion_tokens == 8
    assert all(v <= 0 for v in lp.token_logprobs)
    for token, value, tops in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(tops) <= 2  # fewer when two top tokens have the same text
        assert max(tops.values()) == pytest.approx(value) and tops[token] == pytest.approx(value)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert "".join(lp.tokens) == got.choices[0].text


# ---------------------------------------------------------------------- load and disconnects
def test_32_concurrent_streams_each_get_the_text_they_would_get_alone(server, model, pipe):
    # Completions on the raw prompts (as the serving benchmark sends them): short prefills keep it quick.
    prompts = bench_prompts()[:32]
    config = GenerationConfig(max_new_tokens=8, ignore_eos=True)  # raw prompts often end at once otherwise
    alone = [pipe.async_engine.stream(pipe.tokenizer.encode(p), config) for p in prompts]  # batched in-process
    expected = ["".join(out.new_text for out in outputs) for outputs in alone]

    async def one(aclient, prompt):
        stream = await aclient.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=8,
                                                  stream=True, extra_body={"ignore_eos": True})
        return "".join([c.choices[0].text async for c in stream if c.choices])

    async def run_all():
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0) as aclient:
            return await asyncio.gather(*(one(aclient, p) for p in prompts))

    got = asyncio.run(run_all())
    assert got == expected and len(set(got)) > 16


def test_client_leaving_mid_stream_frees_its_kv_blocks(server, client, model):
    before = wait_for_all_blocks_free(server)
    aborted_before = before["tidemind_requests_total{finish_reason=abort}"]
    stream = chat(client, model, bench_prompts()[4], temperature=0, max_tokens=500, stream=True,
                  extra_body={"ignore_eos": True})
    for _ in range(4):
        next(stream)
    running = metrics(server)
    assert running["tidemind_kv_cache_blocks_free"] < running["tidemind_kv_cache_blocks_total"]
    stream.close()
    after = wait_for_all_blocks_free(server)
    assert after["tidemind_kv_cache_blocks_free"] == after["tidemind_kv_cache_blocks_total"]
    assert after["tidemind_kv_cache_usage_ratio"] == 0
    assert after["tidemind_requests_total{finish_reason=abort}"] == aborted_before + 1
    assert chat(client, model, "Say hi.", temperature=0, max_tokens=4).choices[0].finish_reason in ("stop", "length")


def test_client_leaving_a_non_streaming_request_frees_its_kv_blocks(server, client, model):
    aborted_before = wait_for_all_blocks_free(server)["tidemind_requests_total{finish_reason=abort}"]
    body = {"model": model, "messages": [{"role": "user", "content": "Count to a thousand."}], "temperature": 0,
            "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/chat/completions", json=body, timeout=1.5)
    after = wait_for_all_blocks_free(server)
    assert after["tidemind_kv_cache_blocks_free"] == after["tidemind_kv_cache_blocks_total"]
    assert after["tidemind_requests_total{finish_reason=abort}"] == aborted_before + 1
    assert chat(client, model, "Say hi.", temperature=0, max_tokens=4).usage.completion_tokens <= 4
