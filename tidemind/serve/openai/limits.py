"""The api_server's request limits: the body size (enforced while the body is read, before any JSON
parsing), the character bound on prompts (checked before tokenizing) and the dynamic ones
(max_tokens, prompt length) that GET /v1/models lists with the static ones of protocol.py.
"""
from __future__ import annotations

from typing import Optional

from .errors import LIMITS_HINT, OpenAIError
from .protocol import MAX_CHOICES, MAX_N, MAX_STOP_CHARS, MAX_STOP_SEQUENCES, MAX_TOP_LOGPROBS, ServerLimits


def server_limits(max_total_tokens: int, max_token_chars: int, max_request_bytes: Optional[int]) -> ServerLimits:
    """The limits of a server whose sequences hold `max_total_tokens` tokens and whose tokenizer's
    tokens stand for at most `max_token_chars` characters each."""
    max_prompt_tokens = max_total_tokens - 1  # an answer needs room for one token at least
    return ServerLimits(max_tokens=max_total_tokens - 1, prompt_tokens=max_prompt_tokens,
                        prompt_chars=max_prompt_tokens * max_token_chars, n=MAX_N, choices=MAX_CHOICES,
                        logprobs=MAX_TOP_LOGPROBS, top_logprobs=MAX_TOP_LOGPROBS, stop_sequences=MAX_STOP_SEQUENCES,
                        stop_sequence_chars=MAX_STOP_CHARS, request_bytes=max_request_bytes)


def check_max_tokens(limits: ServerLimits, max_tokens: Optional[int], param: str) -> None:
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise OpenAIError(400, f"{param}: at most {limits.max_tokens}, the server's session length minus one "
                               f"prompt token ({LIMITS_HINT}); leave it out to answer up to the session length",
                          param=param)


def check_choices(limits: ServerLimits, num_prompts: int, n: int) -> None:
    """Refuse, before anything is tokenized or submitted, a request for more choices (engine
    requests: prompts x n samples, best_of's when larger) than `limits.choices`: they would all be
    submitted at once, from the event loop, and a body of small prompts holds millions."""
    if num_prompts * n > limits.choices:
        raise OpenAIError(400, f"prompt: {num_prompts} prompts x {n} samples (n or best_of) are {num_prompts * n} "
                               f"choices, more than {limits.choices} per request ({LIMITS_HINT}): send the prompts "
                               f"in several requests", param="prompt")


def check_prompt_chars(limits: ServerLimits, num_chars: int, param: str) -> None:
    """Refuse, before tokenizing it, a prompt too long to fit in a session whatever its tokens:
    more than prompt_chars = prompt_tokens x the longest token's characters."""
    if num_chars > limits.prompt_chars:
        raise OpenAIError(400, f"{param}: {num_chars} characters are more than a prompt of at most "
                               f"{limits.prompt_tokens} tokens can hold ({limits.prompt_chars} characters, "
                               f"{LIMITS_HINT}): shorten the prompt or raise --session-len", param=param)


def _too_large(max_bytes: int) -> OpenAIError:
    return OpenAIError(413, f"the request body is larger than {max_bytes} bytes, this server's limit "
                            f"(--max-request-bytes): send a smaller request", code="request_too_large")


class BodySizeLimit:
    """Answers 413 to a request whose body is over `max_bytes`: at once from its Content-Length, or
    once that many bytes of a chunked body have arrived; nothing of it is parsed. Pure ASGI.

    The body is read here, before the app runs (the app would read it all anyway), and handed on
    from memory; later receive() calls (waiting for a disconnect) go to the server."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(self.max_bytes).response()(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending: nothing to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await _too_large(self.max_bytes).response()(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay():
            nonlocal body
            if body is None:
                return await receive()
            message, body = body, None
            return message

        await self.app(scope, replay, send)
