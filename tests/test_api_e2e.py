"""pipeline() on the bundled SmolLM2: sampling semantics, streaming, sessions and bad input."""
from __future__ import annotations

import json

import pytest

from fake_runner import all_blocks_free_soon
from hf_reference import bench_prompts
from tidemind import EngineConfig, GenerationConfig, Response, pipeline

pytestmark = pytest.mark.slow

SAMPLED = GenerationConfig(max_new_tokens=24, do_sample=True, temperature=1.0, top_p=0.95, top_k=0,
                           random_seed=1234)


@pytest.fixture(scope="module")
def pipe():
    with pipeline(backend_config=EngineConfig(dtype="float32", device="cpu", session_len=512)) as p:
        yield p


def test_same_seed_same_text_alone_and_in_a_batch(pipe):
    prompt = bench_prompts()[2]
    alone = pipe(prompt, SAMPLED)
    others = [GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.7, random_seed=s) for s in (5, 6)]
    batch = pipe([bench_prompts()[0], prompt, bench_prompts()[5]], [others[0], SAMPLED, others[1]])
    assert batch[1].token_ids == alone.token_ids
    assert pipe(prompt, SAMPLED.replace(random_seed=99)).token_ids != alone.token_ids


def test_top_k_1_sampling_equals_greedy(pipe):
    prompts = bench_prompts()[:4]
    greedy = pipe(prompts, GenerationConfig(max_new_tokens=32))
    top1 = pipe(prompts, GenerationConfig(max_new_tokens=32, do_sample=True, temperature=1.3, top_k=1,
                                          random_seed=3))
    assert [r.token_ids for r in top1] == [r.token_ids for r in greedy]


def _stop_across_boundary(pipe, response: Response) -> str:
    """A stop string made of the end of one token's text and the start of the next one's."""
    for i in range(3, len(response.token_ids) - 1):
        left = pipe.tokenizer.decode(response.token_ids[i:i + 1])
        right = pipe.tokenizer.decode(response.token_ids[i + 1:i + 2])
        if len(left.strip()) >= 2 and len(right.strip()) >= 2 and left[-2:].isalpha() and right[:2].isalpha():
            candidate = left[-2:] + right[:2]
            if response.text.count(candidate) == 1:
                return candidate
    pytest.skip("no token boundary inside a word in this answer")


def test_stop_word_across_token_boundary(pipe):
    prompt = bench_prompts()[1]
    full = pipe(prompt, GenerationConfig(max_new_tokens=48))
    stop = _stop_across_boundary(pipe, full)
    cut = full.text.index(stop)
    stopped = pipe(prompt, GenerationConfig(max_new_tokens=48, stop_words=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == full.text[:cut]
    kept = pipe(prompt, GenerationConfig(max_new_tokens=48, stop_words=[stop], include_stop_str_in_output=True))
    assert kept.text == full.text[:cut + len(stop)]
    assert all_blocks_free_soon(pipe.engine.block_manager)


def test_n_gives_n_completions(pipe):
    out = pipe(bench_prompts()[3], SAMPLED.replace(n=3))
    assert isinstance(out, list) and len(out) == 3
    assert len({tuple(r.token_ids) for r in out}) == 3
    both = pipe(bench_prompts()[:2], SAMPLED.replace(n=3))
    assert [len(x) for x in both] == [3, 3]
    assert [r.token_ids for r in both[1]] != [r.token_ids for r in both[0]]


def test_logprobs_and_response_fields(pipe):
    r = pipe(bench_prompts()[0], GenerationConfig(max_new_tokens=8, logprobs=3, ignore_eos=True))
    assert r.generate_token_len == len(r.token_ids) == 8 and r.finish_reason == "length"
    assert r.input_token_len == len(pipe.encode_prompt(bench_prompts()[0]))
    assert len(r.logprobs) == 8
    for token, top in zip(r.token_ids, r.logprobs):
        assert token in top and 3 <= len(top) <= 4
        assert top[token] == max(top.values())  # greedy: the chosen token is the most likely


def test_stream_infer_deltas_add_up_to_the_answer(pipe):
    prompts = bench_prompts()[:3]
    full = pipe(prompts, GenerationConfig(max_new_tokens=20))
    texts, finished = ["", "", ""], set()
    for delta in pipe.stream_infer(prompts, GenerationConfig(max_new_tokens=20)):
        texts[delta.index] += delta.text
        if delta.finish_reason:
            finished.add(delta.index)
    assert finished == {0, 1, 2}
    assert texts == [r.text for r in full]


def test_message_lists_and_chat_sessions(pipe):
    messages = [{"role": "user", "content": "What is 2 + 2?"}]
    assert pipe(messages, GenerationConfig(max_new_tokens=16)).text == pipe("What is 2 + 2?", GenerationConfig(max_new_tokens=16)).text
    batch = pipe([messages, messages], GenerationConfig(max_new_tokens=8))
    assert len(batch) == 2 and batch[0].text == batch[1].text
    session = pipe.chat("My name is Ada. Say hello.", gen_config=GenerationConfig(max_new_tokens=24))
    first = session.response.text
    session = pipe.chat("What is my name?", session=session, gen_config=GenerationConfig(max_new_tokens=24))
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first
    # The second turn's prompt holds the first turn: it is longer than the question alone.
    assert session.response.input_token_len > len(pipe.encode_prompt("What is my name?"))
    pipe.end_session(session)


def test_chat_turns_reuse_the_conversations_kv_and_match_a_fresh_full_prompt(pipe):
    greedy = GenerationConfig(max_new_tokens=24)
    session = pipe.chat("Name a fruit that is red.", gen_config=greedy)
    first = session.response
    cached_before = pipe.engine.stats()["cached_prompt_tokens_total"]
    session = pipe.chat("And one that is yellow?", session=session, gen_config=greedy)
    second = session.response
    # All of the first turn but its last token came from the session's KV cache.
    cached = pipe.engine.stats()["cached_prompt_tokens_total"] - cached_before
    assert cached == first.input_token_len + first.generate_token_len - 1
    fresh = pipe(session.history[:-1], greedy)
    assert fresh.text == second.text
    pipe.end_session(session)
    assert all_blocks_free_soon(pipe.engine.block_manager)


def test_use_tqdm_shows_progress(pipe, capsys):
    pipe(bench_prompts()[:2], GenerationConfig(max_new_tokens=4), use_tqdm=True)
    assert "2/2" in capsys.readouterr().err


# ---------------------------------------------------------------- bad input
def test_missing_model_path_names_the_choices():
    with pytest.raises((ValueError, FileNotFoundError), match="nor an existing path.*bundled"):
        pipeline("/no/such/model/dir")


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["FooForCausalLM"], "model_type": "foo"}))
    with pytest.raises(ValueError, match="FooForCausalLM.*LlamaForCausalLM|LlamaForCausalLM.*FooForCausalLM"):
        pipeline(str(tmp_path))


@pytest.mark.parametrize("bad", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(max_new_tokens=-1), dict(n=0), dict(min_p=2.0), dict(logprobs=100)])
def test_invalid_generation_config_raises(bad):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        GenerationConfig(**bad)


def test_prompt_longer_than_session_is_refused_and_others_go_on(pipe):
    long_prompt = "word " * 800  # > session_len=512 tokens
    stream = pipe.stream_infer(bench_prompts()[0], GenerationConfig(max_new_tokens=24, ignore_eos=True))
    first = next(stream)  # a request is running
    with pytest.raises(ValueError, match="session_len"):
        pipe(long_prompt, GenerationConfig(max_new_tokens=4))
    rest = [first] + list(stream)
    assert rest[-1].finish_reason == "length" and sum(len(d.token_ids) for d in rest) == 24
    assert pipe(bench_prompts()[0], GenerationConfig(max_new_tokens=4)).generate_token_len == 4
    assert all_blocks_free_soon(pipe.engine.block_manager)


def test_abandoned_stream_is_aborted_and_frees_its_blocks(pipe):
    stream = pipe.stream_infer(bench_prompts()[4], GenerationConfig(max_new_tokens=200, ignore_eos=True))
    next(stream)
    next(stream)
    stream.close()  # the caller walks away: the request is aborted
    assert all_blocks_free_soon(pipe.engine.block_manager)
    assert pipe(bench_prompts()[4], GenerationConfig(max_new_tokens=4)).generate_token_len == 4


def test_a_cancelled_chat_turn_frees_its_session_at_once(pipe):
    session = pipe.new_session()
    stream = pipe.chat("Tell me a long story.", session=session, stream_response=True,
                       gen_config=GenerationConfig(max_new_tokens=200, ignore_eos=True))
    next(stream)
    stream.close()  # the turn is aborted; the next one must not find the session busy
    session = pipe.chat("Say hi.", session=session, gen_config=GenerationConfig(max_new_tokens=4, ignore_eos=True))
    assert session.response.generate_token_len == 4
    assert [m["role"] for m in session.history] == ["user", "assistant"]  # the aborted turn is forgotten
    pipe.end_session(session)
    assert all_blocks_free_soon(pipe.engine.block_manager)
