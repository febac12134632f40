"""POST /v1/completions: text or token-id prompts without a chat template, answered whole or as SSE.

max_tokens absent: 16 tokens, OpenAI's and LMDeploy's default (LMDeploy's max_completion_tokens is
taken too). echo puts each prompt in front of its choices, with the prompt tokens' log-probabilities
when logprobs is set (the first token's are null: nothing predicts it); echo with max_tokens=0
returns the prompt alone, which scores a text (lm-eval's loglikelihood). best_of samples that many
and returns the n with the highest mean token log-probability (not streamed, as OpenAI).
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Dict, List, Optional, Sequence

from fastapi import Request
from starlette.responses import JSONResponse, Response

from .errors import OpenAIError, request_id
from .extensions import check_grammar, refuse_unsupported, request_config, response_format_of, structured_param
from .generation import Sample, collect_samples, respond, safe_logprob, submit_all, top_entries
from .limits import check_choices, check_max_tokens, check_prompt_chars
from .protocol import COMPLETIONS_DEFAULT_MAX_TOKENS, CompletionRequest
from .streaming import UsageOptions, output_events, usage


def completion_prompts(state, prompt, add_bos: bool = True) -> List[List[int]]:
    """Token ids of each prompt: text is encoded as is (no chat template), ids are taken as given."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    return [state.pipe.tokenizer.encode(p, add_bos=add_bos) if isinstance(p, str) else list(p) for p in prompt]


def check_text_chars(state, texts, param: str) -> None:
    for text in [texts] if isinstance(texts, str) else texts:
        if isinstance(text, str):
            check_prompt_chars(state.limits, len(text), param)


def _prompt_texts(state, prompt, prompts: Sequence[Sequence[int]]) -> List[str]:
    """What echo writes for each prompt: the text as sent, or the decoded token ids."""
    items = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
    return [item if isinstance(item, str) else state.pipe.tokenizer.decode(ids, skip_special_tokens=False)
            for item, ids in zip(items, prompts)]


def _prompt_logprobs(state, ids: Sequence[int], entries, num_top: int) -> dict:
    """Completions-shaped log-probabilities of the prompt tokens (null for those none were computed for)."""
    tokens, values, tops, offsets, offset = [], [], [], [], 0
    entries = entries or [None] * len(ids)
    for token_id, entry in zip(ids, entries):
        text = state.token(token_id)
        tokens.append(text)
        values.append(None if entry is None else safe_logprob(entry[token_id]))
        tops.append(None if entry is None
                    else {state.token(t): safe_logprob(v) for t, v in top_entries(entry, num_top)})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def _merge(first: dict, second: dict) -> dict:
    return {key: first[key] + second[key] for key in first}


def _mean_logprob(sample: Sample) -> float:
    values = [entry[token] for token, entry in zip(sample.token_ids, sample.logprobs)]
    return sum(values) / len(values) if values else 0.0


class _Plan:
    """What the request asks of each choice, beyond the engine's sampling."""

    def __init__(self, body: CompletionRequest, max_tokens: int):
        self.n = body.n or 1
        self.best_of = body.best_of or self.n
        if self.best_of < self.n:
            raise OpenAIError(400, f"best_of ({self.best_of}) must be >= n ({self.n})", param="best_of")
        if body.stream and self.best_of > self.n:
            raise OpenAIError(400, "best_of > n cannot be streamed (the best are known at the end): remove stream",
                              param="best_of")
        self.echo = bool(body.echo)
        if max_tokens == 0 and not self.echo:
            raise OpenAIError(400, "max_tokens: 0 generates nothing; ask for at least 1 token, or set echo "
                                   "(with logprobs) to score the prompt", param="max_tokens")
        self.num_top = body.logprobs
        self.prompt_logprobs = self.num_top if self.echo and self.num_top is not None else None
        # echo with max_tokens=0: one token is generated (its prefill computes the prompt's
        # log-probabilities) and dropped
        self.drop_output = self.echo and max_tokens == 0
        self.engine_max_tokens = 1 if self.drop_output else max_tokens
        self.sample_logprobs = self.num_top if self.num_top is not None else (0 if self.best_of > self.n else None)

    def choice_logprobs(self, state, ids, sample: Sample, offset: int) -> Optional[dict]:
        if self.num_top is None:
            return None
        generated = state.completion_logprobs([] if self.drop_output else sample.token_ids,
                                              [] if self.drop_output else sample.logprobs, self.num_top, offset)
        if not self.echo:
            return generated
        return _merge(_prompt_logprobs(state, ids, sample.prompt_logprobs, self.num_top), generated)


async def completions(state, body: CompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    state.fields.check(body)
    refuse_unsupported(body)
    max_tokens, param = next(((v, p) for v, p in ((body.max_tokens, "max_tokens"),
                                                   (body.max_completion_tokens, "max_completion_tokens"))
                              if v is not None), (COMPLETIONS_DEFAULT_MAX_TOKENS, "max_tokens"))
    check_max_tokens(state.limits, max_tokens, param)
    plan = _Plan(body, max_tokens)
    single = isinstance(body.prompt, str) or isinstance(body.prompt[0], int)
    check_choices(state.limits, 1 if single else len(body.prompt), plan.best_of)
    response_format = response_format_of(body)
    check_grammar(response_format, structured_param(body))
    check_text_chars(state, body.prompt, "prompt")
    prompts = await asyncio.to_thread(completion_prompts, state, body.prompt, body.add_special_tokens is not False)
    texts = _prompt_texts(state, body.prompt, prompts) if plan.echo else [""] * len(prompts)
    configs = [request_config(state, body, len(ids), plan.engine_max_tokens, plan.engine_max_tokens,
                              plan.sample_logprobs, response_format, prompt_logprobs=plan.prompt_logprobs)
               for ids in prompts]
    group = state.new_group()
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": state.model_name}
    prompt_tokens = sum(len(ids) for ids in prompts)

    async def body_response() -> Response:
        samples: List[Sample] = await collect_samples(group)
        choices = []
        for p, ids in enumerate(prompts):
            candidates = samples[p * plan.best_of:(p + 1) * plan.best_of]
            if plan.best_of > plan.n:
                candidates = sorted(candidates, key=_mean_logprob, reverse=True)[:plan.n]
            for sample in candidates:
                text = texts[p] + ("" if plan.drop_output else sample.text)
                choices.append({"index": len(choices), "text": text, "finish_reason": sample.finish_reason,
                                "logprobs": plan.choice_logprobs(state, ids, sample, len(texts[p]))})
        generated = 0 if plan.drop_output else sum(s.num_generated_tokens for s in samples)
        return JSONResponse({**head, "choices": choices, "usage": usage(prompt_tokens, generated)})

    async def events():
        echoed: Dict[int, bool] = {}
        offsets = [0] * len(group)  # characters of each choice's text sent so far

        def chunks_of(index: int, out) -> List[dict]:
            prompt_index = index // plan.n
            chunks = []
            if plan.echo and not echoed.get(index):
                echoed[index] = True
                logprobs = (_prompt_logprobs(state, prompts[prompt_index], out.prompt_logprobs, plan.num_top)
                            if plan.num_top is not None else None)
                offsets[index] = len(texts[prompt_index])
                chunks.append({"choices": [{"index": index, "text": texts[prompt_index], "logprobs": logprobs,
                                            "finish_reason": None}]})
            text = "" if plan.drop_output else out.new_text
            logprobs = None
            if plan.num_top is not None and out.new_logprobs and not plan.drop_output:
                logprobs = state.completion_logprobs(out.new_token_ids, out.new_logprobs, plan.num_top, offsets[index])
            offsets[index] += len(text)
            if text or out.finished or logprobs:
                chunks.append({"choices": [{"index": index, "text": text, "logprobs": logprobs,
                                            "finish_reason": out.finish_reason if out.finished else None}]})
            return chunks

        async for event in output_events(request_id(request), group, chunks_of, head, prompt_tokens,
                                         UsageOptions.of(body)):
            yield event

    return await respond(request, state.limit, group, bool(body.stream), events, "text/event-stream", body_response,
                         lambda: submit_all(group, state.validate, prompts, configs, plan.best_of, body.seed, "prompt"))
