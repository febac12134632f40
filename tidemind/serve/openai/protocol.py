"""Request and response bodies of the HTTP server (pydantic models; they also make /openapi.json).

Requests refuse unknown fields (HTTP 400 naming the field), so that a setting the server does not
support is never silently ignored. Types are strict: a value of the wrong JSON type (`"stream":
"yes"`, `"max_tokens": "5"` or `5.0`, `"temperature": true`) is a 400, never converted; integers are
accepted where numbers go. Bounds match GenerationConfig's, named with the OpenAI / LMDeploy field
names the client sent; the bounds that are server limits are listed by GET /v1/models.
"""
from __future__ import annotations

import re
from typing import Annotated, Any, Dict, List, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_N = 16  # choices per prompt; each is one engine request
MAX_CHOICES = 256  # choices of one request (completions: prompts x n), submitted at once
MAX_TOP_LOGPROBS = 20  # GenerationConfig.logprobs' bound
MAX_STOP_SEQUENCES = 32
MAX_STOP_CHARS = 256  # per stop sequence: the detokenizer holds back up to this much text

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
StopWord = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Union[StopWord, Annotated[List[StopWord], Field(max_length=MAX_STOP_SEQUENCES)]]
TokenId = Annotated[int, Field(ge=0)]

_SURROGATE = re.compile("[\ud800-\udfff]")
FIELD_NAME = "(a field name)"  # the last step of a path that ends at an object key


def lone_surrogate_path(value: Any) -> Optional[tuple]:
    """The path (keys and indices) to the first string or object key of a parsed JSON value that
    holds a UTF-16 surrogate, or None; a path to a key ends with FIELD_NAME. JSON's "\\ud800"
    escapes decode to such code points, which are not Unicode characters: no tokenizer or UTF-8
    encoder takes them."""
    stack = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return path
            continue
        if not isinstance(item, (dict, list)):
            continue
        children = item.items() if isinstance(item, dict) else enumerate(item)
        for key, child in children:
            if isinstance(key, str) and _SURROGATE.search(key):
                return path + (FIELD_NAME,)
            if isinstance(child, (str, dict, list)):  # token ids and other numbers hold no text
                stack.append((child, path + (key,)))
    return None


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class _Body(_Request):
    """A whole request body: refused at once when some text in it is not valid Unicode."""

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data):
        path = lone_surrogate_path(data)
        if path is not None:
            raise PydanticCustomError(
                "invalid_unicode", "{where}: the text holds a lone UTF-16 surrogate (a \\uD800-\\uDFFF escape "
                "without its pair), which is not valid Unicode: send valid UTF-8 text",
                {"where": ".".join(map(str, path)) or "the body",
                 "param": str(path[0]) if path and path[0] != FIELD_NAME else None})
        return data


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for "system"
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart], None] = None
    name: Optional[str] = Field(None, description="accepted for compatibility; not shown to the model")

    def as_template_message(self) -> Dict[str, str]:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingFields(_Body):
    """Fields shared by chat and completions: OpenAI's, then the extra ones (vLLM / LMDeploy names)."""

    model: Optional[str] = Field(None, description="the served model name (GET /v1/models); "
                                                   "absent: the served model")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 is greedy; default 1")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=MAX_N, description="choices per prompt")
    max_tokens: Optional[int] = Field(None, ge=1, description="default: up to the session length")
    stop: Optional[Stop] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[Int64] = Field(None, description="choice i uses seed + i; default: a random seed")
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    user: Optional[str] = Field(None, description="accepted for compatibility; not used")
    top_k: Optional[int] = Field(None, ge=-1, description="keep the k most likely tokens; 0 or -1: all (default)")
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, description="1 is off")
    ignore_eos: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    min_new_tokens: Optional[int] = Field(None, ge=0)

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream=true: remove it or set stream")
        return value


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[List[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="preferred over max_tokens")
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true: set it, or remove top_logprobs")
        return value


CompletionPrompt = Union[
    str,
    Annotated[List[str], Field(min_length=1)],
    Annotated[List[TokenId], Field(min_length=1)],
    Annotated[List[Annotated[List[TokenId], Field(min_length=1)]], Field(min_length=1)],
]


class CompletionRequest(SamplingFields):
    prompt: CompletionPrompt = Field(description="text, texts, token ids, or lists of token ids; "
                                                 "text is encoded without a chat template")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                    description="log-probabilities of the chosen and this many top tokens")


class InteractiveRequest(_Body):
    """LMDeploy's /v1/chat/interactive request (its defaults sample: temperature 0.8, top_p 0.8, top_k 40)."""

    prompt: Union[str, List[ChatMessage]] = Field(
        "", description="this turn's text or messages; empty with interactive_mode=false: end the session")
    session_id: int = Field(-1, ge=-1, le=2**63 - 1,
                            description=">= 0 names a conversation; -1 (only with interactive_mode=false): none")
    interactive_mode: bool = Field(False, description="true: continue the session on the server; false: a "
                                                      "one-off request (a session with this id is ended first)")
    stream: bool = False
    stop: Optional[Stop] = None
    request_output_len: Optional[int] = Field(None, ge=1, description="default: up to the session length")
    max_tokens: Optional[int] = Field(None, ge=1, description="alias of request_output_len")
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(40, ge=-1)
    temperature: float = Field(0.8, ge=0, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    cancel: bool = Field(False, description="abort the session's running turn (nothing else is done)")
    seed: Optional[Int64] = None

    @model_validator(mode="after")
    def _session_rules(self):
        if self.session_id < 0 and (self.interactive_mode or self.cancel):
            raise ValueError("session_id must be >= 0 with interactive_mode=true or cancel=true: "
                             "pick an id for the conversation")
        if self.request_output_len is not None and self.max_tokens is not None \
                and self.request_output_len != self.max_tokens:
            raise ValueError("request_output_len and max_tokens disagree: give one of them")
        return self


class EncodeRequest(_Body):
    input: Union[str, Annotated[List[str], Field(min_length=1)]]
    do_preprocess: bool = Field(False, description="apply the chat template (input is a user message)")
    add_bos: bool = Field(True, description="put the tokenizer's BOS in front (when it uses one)")


# ------------------------------------------------------------------ responses
class ErrorBody(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[List[int]] = None


class TokenLogprob(TopLogprob):
    top_logprobs: List[TopLogprob] = Field(default_factory=list)


class ChoiceLogprobs(BaseModel):
    content: Optional[List[TokenLogprob]] = None


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = ""


class ChatChoice(BaseModel):
    index: int
    message: ResponseMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: List[ChatChoice]
    usage: Usage


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChoiceLogprobs] = None
    finish_reason: Optional[str] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: List[ChatChunkChoice]
    usage: Optional[Usage] = None


class CompletionLogprobs(BaseModel):
    tokens: List[str] = Field(default_factory=list)
    token_logprobs: List[float] = Field(default_factory=list)
    top_logprobs: List[Dict[str, float]] = Field(default_factory=list)
    text_offset: List[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: Optional[str] = None


class CompletionResponse(BaseModel):
    """Also the shape of each streamed chunk (then `usage` is null but in the last chunk)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: List[CompletionChoice]
    usage: Optional[Usage] = None


class ServerLimits(BaseModel):
    """The largest value each request field takes on this server (GET /v1/models: tidemind.limits)."""

    max_tokens: int = Field(description="max_tokens / max_completion_tokens of chat and completions: the "
                                        "session length minus one prompt token")
    prompt_tokens: int = Field(description="tokens of a prompt (the session length minus one)")
    prompt_chars: int = Field(description="characters of a prompt, refused before tokenizing: prompt_tokens x "
                                          "the characters of the tokenizer's longest token")
    n: int
    choices: int = Field(description="choices of one request: completions' prompts x n")
    logprobs: int = Field(description="completions' logprobs (top alternatives per token)")
    top_logprobs: int = Field(description="chat's top_logprobs")
    stop_sequences: int = Field(description="entries of stop")
    stop_sequence_chars: int = Field(description="characters of one stop sequence")
    request_bytes: Optional[int] = Field(description="bytes of a request body (--max-request-bytes); null: none")


class ModelCardExtension(BaseModel):
    limits: ServerLimits


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tidemind"
    max_model_len: int
    tidemind: ModelCardExtension


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: List[ModelCard]


class InteractiveResponse(BaseModel):
    """Non-stream: the whole turn. Stream: one JSON object per line with the text delta; counts are
    running totals; finish_reason is set on the last line."""

    text: str
    tokens: int = Field(description="tokens generated in this turn")
    input_tokens: int = Field(description="prompt tokens of this turn, the session's history included")
    history_tokens: int = Field(description="prompt tokens whose KV was reused from the session")
    finish_reason: Optional[str] = None


class EncodeResponse(BaseModel):
    input_ids: Union[List[int], List[List[int]]]
    length: Union[int, List[int]]
