"""The grammar hook of the sampler (runner/structured_output.py) with the bundled SmolLM2 tokenizer and
random logits, no model forward: every token it lets through keeps the answer inside the grammar, the
answer ends with a stop id once the grammar is complete, rows without a grammar sample exactly what
they sample alone, and a preempted request's matcher replays its tokens. Plus logit_bias and the
InputBatch flags that keep plain rows on the argmax fast path."""
from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
import torch

from tidemind.config import GenerationConfig
from tidemind.core.outputs import NewRequestData
from tidemind.core.sampling_params import SamplingParams
from tidemind.loader import resolve_model
from tidemind.runner.input_batch import InputBatch
from tidemind.runner.sampler import Sampler
from tidemind.runner.structured_output import GrammarCompiler

pytestmark = pytest.mark.slow  # converts the bundled GGUF once per session (its tokenizer is what matters)

VOCAB = 49152
EOS = 2
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "tags"],
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}}}


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model(None).path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from tidemind.chat.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(model_dir)


def params(seed: int, response_format=None, **config) -> SamplingParams:
    gen = GenerationConfig(response_format=response_format, **config)
    return SamplingParams.from_generation_config(gen, seed, frozenset({EOS}))


def new_request(request_id: int, sampling: SamplingParams, output=()) -> NewRequestData:
    return NewRequestData(request_id, (1, 2, 3), tuple(output), sampling, (0,), 0)


def run_rows(batch: InputBatch, request_ids, steps: int, seed: int = 0):
    """Sample `steps` tokens for the requests with random logits; returns their token lists."""
    generator = torch.Generator().manual_seed(seed)
    sampler, outputs = Sampler(), {rid: [] for rid in request_ids}
    for _ in range(steps):
        live = [rid for rid in request_ids if not outputs[rid] or outputs[rid][-1] != EOS]
        if not live:
            break
        rows = np.array([batch.row(rid) for rid in live])
        logits = torch.randn(len(live), VOCAB, generator=generator) * 3
        tokens = sampler(logits, [batch.sampling_inputs(int(r)) for r in rows]).token_ids
        batch.append_tokens(rows, np.array(tokens, dtype=np.int32))
        for rid, token in zip(live, tokens):
            outputs[rid].append(token)
    return outputs


# Bounded grammars only: random logits, unlike a model, never choose to end an unbounded string.
@pytest.mark.parametrize("response_format, check", [
    ({"type": "json_schema", "json_schema": {"schema": SCHEMA}},
     lambda text: jsonschema.validate(json.loads(text), SCHEMA)),
    ({"type": "regex_schema", "regex_schema": "[0-9]{3}-[a-z]{2}"}, lambda text: __import__("re").fullmatch(
        "[0-9]{3}-[a-z]{2}", text) or pytest.fail(text)),
    ({"type": "choice", "choice": ["red", "green", "blue"]},
     lambda text: text in ("red", "green", "blue") or pytest.fail(text)),
])
def test_random_logits_under_a_grammar_give_answers_in_the_grammar(model_dir, tokenizer, response_format, check):
    batch = InputBatch(8, 512, 8, GrammarCompiler(model_dir, VOCAB))
    ids = list(range(4))
    for rid in ids:
        batch.add(new_request(rid, params(rid, response_format, do_sample=True, temperature=1.0, top_k=0)))
    outputs = run_rows(batch, ids, steps=300)
    for rid, tokens in outputs.items():
        assert tokens[-1] == EOS, f"request {rid} did not end: {tokenizer.decode(tokens)!r}"
        check(tokenizer.decode(tokens[:-1]))


def test_plain_rows_sample_what_they_sample_alone_and_stay_on_the_fast_path(model_dir):
    compiler = GrammarCompiler(model_dir, VOCAB)
    alone, mixed = InputBatch(4, 512, 8, compiler), InputBatch(4, 512, 8, compiler)
    plain = params(7, None, do_sample=True, temperature=0.9)
    alone.add(new_request(0, plain))
    mixed.add(new_request(0, plain))
    mixed.add(new_request(1, params(8, {"type": "json_object"})))
    assert alone.plain_greedy[alone.row(0)] == mixed.plain_greedy[mixed.row(0)] == False  # noqa: E712 (sampled)
    assert mixed.num_grammar_rows == 1 and alone.num_grammar_rows == 0
    greedy = InputBatch(2, 512, 8, compiler)
    greedy.add(new_request(5, params(1, None)))
    greedy.add(new_request(6, params(1, {"type": "json_object"})))
    assert greedy.plain_greedy[greedy.row(5)] and not greedy.plain_greedy[greedy.row(6)]
    generator = torch.Generator().manual_seed(3)
    for _ in range(5):
        logits = torch.randn(2, VOCAB, generator=generator)
        token_alone = Sampler()(logits[:1].clone(), [alone.sampling_inputs(alone.row(0))]).token_ids[0]
        rows = np.array([mixed.row(0), mixed.row(1)])
        tokens = Sampler()(logits.clone(), [mixed.sampling_inputs(int(r)) for r in rows]).token_ids
        assert tokens[0] == token_alone
        alone.append_tokens(np.array([alone.row(0)]), np.array([token_alone], dtype=np.int32))
        mixed.append_tokens(rows, np.array(tokens, dtype=np.int32))


def test_a_preempted_request_replays_its_tokens_into_a_new_matcher(model_dir, tokenizer):
    compiler = GrammarCompiler(model_dir, VOCAB)
    form = {"type": "json_schema", "json_schema": {"schema": SCHEMA}}
    sampling = params(3, form, do_sample=True, temperature=1.0)
    prefix = tokenizer.encode('{"name": "Al', add_bos=False)
    batch = InputBatch(2, 512, 8, compiler)
    batch.add(new_request(9, sampling, output=prefix))
    outputs = run_rows(batch, [9], steps=200, seed=5)
    jsonschema.validate(json.loads(tokenizer.decode(prefix + outputs[9][:-1])), SCHEMA)
    assert tokenizer.decode(prefix + outputs[9][:-1]).startswith('{"name": "Al')


def test_logit_bias_moves_the_argmax_and_leaves_other_rows_alone():
    logits = torch.zeros(2, 10)
    logits[:, 3] = 1.0
    biased = SamplingParams.from_generation_config(GenerationConfig(logit_bias={"7": 5.0, 3: -100}), 0)
    plain = SamplingParams.from_generation_config(GenerationConfig(), 0)
    from tidemind.runner.logits_processors import SamplingInputs

    out = Sampler()(logits, [SamplingInputs(biased, [1], []), SamplingInputs(plain, [1], [])])
    assert out.token_ids == [7, 3]
    with pytest.raises(ValueError, match="logit_bias"):
        GenerationConfig(logit_bias={"x": 1.0})
    with pytest.raises(ValueError, match="ignore_eos"):
        GenerationConfig(response_format={"type": "json_object"}, ignore_eos=True)
