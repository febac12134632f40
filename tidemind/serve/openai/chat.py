"""POST /v1/chat/completions: messages through the chat template, tools (chat_tools.py), structured
output and the extension fields (extensions.py), answered whole or as SSE chunks (streaming.py).

max_tokens / max_completion_tokens absent: the answer may run to the end of the session
(--session-len), as LMDeploy's chat does.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import List, Optional

from fastapi import Request
from starlette.responses import JSONResponse, Response

from .chat_tools import ChoiceToolStream, ToolPlan, plan_tools
from .errors import OpenAIError, request_id
from .extensions import (chat_template_kwargs_note, check_grammar, refuse_unsupported, request_config,
                         response_format_of, structured_param)
from .generation import collect_samples, respond, submit_all
from .limits import check_max_tokens, check_prompt_chars
from .protocol import ChatCompletionRequest
from .streaming import UsageOptions, output_events, sse, usage


def _grammar(body: ChatCompletionRequest, plan: Optional[ToolPlan]) -> Optional[dict]:
    """The response_format the answer is held to: forced tool calls, or the structured output asked for."""
    response_format = response_format_of(body)
    if plan is not None and plan.forced:
        if response_format is not None:
            raise OpenAIError(400, f"tool_choice {plan.choice!r} forces tool calls: it cannot be combined with "
                                   f"{structured_param(body)}", param="tool_choice")
        response_format = plan.response_format()
        check_grammar(response_format, "tools")
    else:
        check_grammar(response_format, structured_param(body))
    return response_format


def _message(text: str, prefix: str, plan: Optional[ToolPlan], finish_reason: Optional[str]) -> tuple:
    """(the answer's message, its finish_reason): tool calls split out of the text when tools are on."""
    if plan is None:
        return {"role": "assistant", "content": prefix + text}, finish_reason
    content, calls = plan.split(text)
    message = {"role": "assistant", "content": prefix + content if content else (prefix or None)}
    if calls:
        message["tool_calls"] = [call.openai() for call in calls]
        if finish_reason == "stop":
            finish_reason = "tool_calls"
    return message, finish_reason


async def chat_completions(state, body: ChatCompletionRequest, request: Request) -> Response:
    state.check_model(body.model)
    state.fields.check(body)
    refuse_unsupported(body)
    max_tokens, max_tokens_field = ((body.max_completion_tokens, "max_completion_tokens")
                                    if body.max_completion_tokens else (body.max_tokens, "max_tokens"))
    check_max_tokens(state.limits, max_tokens, max_tokens_field)
    plan = plan_tools(body)
    response_format = _grammar(body, plan)
    messages = [m.as_template_message() for m in body.messages]
    check_prompt_chars(state.limits, sum(len(m["content"]) for m in messages), "messages")
    template_kwargs = chat_template_kwargs_note(body, state.pipe.chat_template, state.notes)
    prompt_ids = await asyncio.to_thread(state.encode_chat, messages, plan, template_kwargs)
    num_top = (body.top_logprobs or 0) if body.logprobs else None
    config = request_config(state, body, len(prompt_ids), max_tokens, max(1, state.max_total_tokens - len(prompt_ids)),
                            num_top, response_format)
    # vLLM's echo: an answer that continues the last assistant message starts with its text
    prefix = messages[-1]["content"] if body.echo and messages[-1]["role"] == "assistant" else ""
    n, group = body.n or 1, state.new_group()
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}

    async def body_response() -> Response:
        samples = await collect_samples(group)
        choices = []
        for i, sample in enumerate(samples):
            message, finish_reason = _message(sample.text, prefix, plan, sample.finish_reason)
            logprobs = state.chat_logprobs(sample.token_ids, sample.logprobs, num_top) if num_top is not None else None
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish_reason})
        return JSONResponse({**head, "object": "chat.completion", "choices": choices,
                             "usage": usage(len(prompt_ids), sum(s.num_generated_tokens for s in samples))})

    options = UsageOptions.of(body)

    async def events():
        chunk_head = {**head, "object": "chat.completion.chunk"}
        streams = [ChoiceToolStream(plan) if plan is not None else None for _ in range(n)]
        for i in range(n):
            first = {"choices": [{"index": i, "delta": {"role": "assistant", "content": prefix},
                                  "logprobs": None, "finish_reason": None}]}
            yield sse({**chunk_head, **first, **options.extra(len(prompt_ids), 0)})
        async for event in output_events(request_id(request), group,
                                         lambda index, out: _chunks(state, streams[index], index, out, num_top),
                                         chunk_head, len(prompt_ids), options):
            yield event

    return await respond(request, state.limit, group, bool(body.stream), events, "text/event-stream", body_response,
                         lambda: submit_all(group, state.validate, [prompt_ids], [config], n, body.seed, "messages"))


def _chunks(state, stream: Optional[ChoiceToolStream], index: int, out, num_top: Optional[int]) -> List[dict]:
    """The chunks of one engine output: its text (less what the tool stream holds back), its
    completed tool calls, and the finish_reason on the last one."""
    content, calls = (out.new_text, []) if stream is None else stream.feed(out.new_text, out.finished)
    logprobs = (state.chat_logprobs(out.new_token_ids, out.new_logprobs, num_top)
                if num_top is not None and out.new_logprobs else None)
    if not (content or calls or out.finished or logprobs):
        return []
    delta = {"content": content} if content or not calls else {}
    if calls:
        delta["tool_calls"] = calls
    finish_reason = None
    if out.finished:
        finish_reason = "tool_calls" if stream is not None and stream.calls_sent and out.finish_reason == "stop" \
            else out.finish_reason
    return [{"choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}]
