"""Result types shared by the Python API, the engine and the server."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

# Why a sequence ended: "stop" (EOS, a stop token or a stop word), "length" (max_new_tokens or
# session_len reached), "abort" (cancelled by the caller), "error" (the request could not run).
FINISH_REASONS = ("stop", "length", "abort", "error")

# One generated token's log-probabilities: {token_id: logprob} holding the chosen token and the
# requested number of most likely alternatives.
TokenLogprobs = Dict[int, float]


@dataclass
class Response:
    """A finished (or, from stream_infer, partial) answer to one prompt."""

    text: str
    generate_token_len: int
    input_token_len: int
    session_id: int
    finish_reason: Optional[str] = None
    token_ids: List[int] = field(default_factory=list)
    logprobs: Optional[List[TokenLogprobs]] = None
    index: int = 0  # position of the prompt in the batch it came in
    # GenerationConfig.prompt_logprobs: one entry per prompt token (None for the first)
    prompt_logprobs: Optional[List[Optional[TokenLogprobs]]] = None


@dataclass
class RequestOutput:
    """What one engine step produced for one request: deltas since the previous output.

    The engine emits one of these per request per step in which the request gained a token or
    finished; a consumer appends the deltas.
    """

    request_id: int
    new_token_ids: List[int]
    new_text: str
    num_prompt_tokens: int
    num_generated_tokens: int
    new_logprobs: Optional[List[TokenLogprobs]] = None
    finished: bool = False
    finish_reason: Optional[str] = None
    error: Optional[str] = None  # set with finish_reason == "error"
    num_cached_tokens: int = 0  # prompt tokens whose KV was reused rather than computed
    # With the first output of a request whose GenerationConfig.prompt_logprobs is set: one entry per
    # prompt token (None for the first, which nothing predicts)
    prompt_logprobs: Optional[List[Optional[TokenLogprobs]]] = None
