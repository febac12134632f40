"""Request and response bodies of the HTTP server (pydantic models; they also make /openapi.json).

Requests take what real clients send: every OpenAI field, and the extension fields of LMDeploy's
and vLLM's servers (honoured where tidemind has the feature, refused with a 400 naming the field
where a value asks for something it cannot do). A field no model here knows is kept aside
(`model_extra`): extensions.py ignores it, logged once per field name, or refuses it when the
server runs with --strict-fields; one with a null or empty value is always ignored. Types are
strict: a known field with a value of the wrong JSON type (`"stream": "yes"`, `"max_tokens": "5"`
or `5.0`, `"temperature": true`) is a 400, never converted; integers are accepted where numbers go.
Bounds match GenerationConfig's; the bounds that are server limits are listed by GET /v1/models.
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
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's and LMDeploy's default for /v1/completions

Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
StopWord = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
Stop = Union[StopWord, Annotated[List[StopWord], Field(max_length=MAX_STOP_SEQUENCES)]]
TokenId = Annotated[int, Field(ge=0)]
Bias = Annotated[float, Field(ge=-100, le=100)]

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
    # extra="allow": unknown fields are kept in model_extra for extensions.py to judge
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False, populate_by_name=True)


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


class FunctionCall(_Request):
    name: str
    arguments: Union[str, Dict[str, Any]] = Field("{}", description="a JSON object, as a string (OpenAI) or as is")


class ToolCallRequest(_Request):
    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    # "developer" is OpenAI's newer name for "system"
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, List[TextPart], None] = None
    name: Optional[str] = Field(None, description="accepted for compatibility; not shown to the model")
    tool_calls: Optional[List[ToolCallRequest]] = Field(None, description="an assistant's earlier calls")
    tool_call_id: Optional[str] = Field(None, description="the call a tool message answers")

    def as_template_message(self) -> Dict[str, Any]:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content or [])
        message: Dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump(include={"id", "type", "function"}) for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class StreamOptions(_Request):
    include_usage: Optional[bool] = False
    continuous_usage_stats: Optional[bool] = Field(False, description="vLLM's: usage in every chunk")


class JsonSchemaFormat(_Request):
    name: Optional[str] = None
    description: Optional[str] = None
    schema_: Union[Dict[str, Any], bool, None] = Field(None, alias="schema")
    strict: Optional[bool] = Field(None, description="the schema is always enforced while decoding")


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema", "regex_schema"]
    json_schema: Optional[JsonSchemaFormat] = None
    regex_schema: Optional[str] = Field(None, description="LMDeploy's regex form")

    @model_validator(mode="after")
    def _has_its_spec(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs {\"json_schema\": {\"name\": ..., "
                             "\"schema\": {...}}}")
        if self.type == "regex_schema" and not self.regex_schema:
            raise ValueError("response_format of type regex_schema needs a non-empty \"regex_schema\"")
        return self


class StructuredOutputs(_Request):
    """vLLM's structured_outputs (the newer form of its guided_* fields): one of them."""

    json_: Union[Dict[str, Any], str, None] = Field(None, alias="json")
    regex: Optional[str] = None
    choice: Optional[List[str]] = None
    grammar: Optional[str] = None
    json_object: Optional[bool] = None


class SamplingFields(_Body):
    """Fields shared by chat and completions: OpenAI's, then LMDeploy's and vLLM's extensions."""

    model: Optional[str] = Field(None, description="the served model name (GET /v1/models); "
                                                   "absent: the served model")
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 is greedy; default 1")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=MAX_N, description="choices per prompt")
    max_tokens: Optional[int] = Field(None, ge=0, description="chat: >= 1, default up to the session length; "
                                                              f"completions: default {COMPLETIONS_DEFAULT_MAX_TOKENS}, "
                                                              f"0 only with echo")
    stop: Optional[Stop] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[Int64] = Field(None, description="choice i uses seed + i; default: a random seed")
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[Dict[str, Bias]] = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    response_format: Optional[ResponseFormat] = None
    user: Optional[str] = Field(None, description="accepted for compatibility; not used")
    # LMDeploy's and vLLM's extensions
    top_k: Optional[int] = Field(None, ge=-1, description="keep the k most likely tokens; 0 or -1: all (default)")
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0, description="1 is off")
    ignore_eos: Optional[bool] = False
    skip_special_tokens: Optional[bool] = True
    spaces_between_special_tokens: Optional[bool] = Field(True, description="no effect: fast tokenizers decode "
                                                                            "the same either way")
    min_new_tokens: Optional[int] = Field(None, ge=0)
    min_tokens: Optional[int] = Field(None, ge=0, description="vLLM's name of min_new_tokens")
    stop_token_ids: Optional[List[TokenId]] = Field(None, max_length=MAX_STOP_SEQUENCES)
    include_stop_str_in_output: Optional[bool] = False
    bad_words: Optional[List[StopWord]] = Field(None, max_length=MAX_STOP_SEQUENCES)
    guided_json: Union[Dict[str, Any], str, None] = Field(None, description="vLLM's: a JSON schema the answer follows")
    guided_regex: Optional[str] = None
    guided_choice: Optional[Annotated[List[StopWord], Field(min_length=1)]] = None
    guided_grammar: Optional[str] = Field(None, description="a Lark or GBNF grammar")
    guided_decoding_backend: Optional[str] = Field(None, description="accepted; the engine is llguidance")
    guided_whitespace_pattern: Optional[str] = Field(None, description="whitespace allowed in JSON answers (a "
                                                                       "regex); default: none but after , and :")
    structured_outputs: Optional[StructuredOutputs] = None
    session_id: Optional[int] = Field(None, description="LMDeploy's; no meaning for stateless requests")
    adapter_name: Optional[str] = Field(None, description="LMDeploy's LoRA adapter: tidemind serves none")
    use_beam_search: Optional[bool] = Field(False, description="vLLM's; beam search is not implemented")

    @field_validator("stream_options")
    @classmethod
    def _stream_options_need_stream(cls, value, info: ValidationInfo):
        asks = value is not None and (value.include_usage or value.continuous_usage_stats)
        if asks and not info.data.get("stream"):
            raise ValueError("stream_options asks for usage chunks but stream is not true: remove it or set stream")
        return value


class FunctionDefinition(_Request):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: Optional[str] = None
    parameters: Optional[Dict[str, Any]] = Field(None, description="a JSON schema of the arguments object")
    strict: Optional[bool] = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


class ChatCompletionRequest(SamplingFields):
    max_tokens: Optional[int] = Field(None, ge=1, description="default: up to the session length")
    messages: Union[Annotated[str, Field(min_length=1)], Annotated[List[ChatMessage], Field(min_length=1)]] = Field(
        description="the conversation; a string is one user message (LMDeploy's form)")
    max_completion_tokens: Optional[int] = Field(None, ge=1, description="preferred over max_tokens")
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[List[Tool]] = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], NamedToolChoice, None] = None
    parallel_tool_calls: Optional[bool] = True
    echo: Optional[bool] = Field(False, description="vLLM's: an answer continuing the last assistant message "
                                                    "starts with that message's text")
    add_generation_prompt: Optional[bool] = True
    continue_final_message: Optional[bool] = False
    chat_template_kwargs: Optional[Dict[str, Any]] = Field(None, description="passed to the model's own Jinja "
                                                                             "template")
    reasoning_effort: Optional[str] = Field(None, description="accepted; the served model does not reason")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value, info: ValidationInfo):
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true: set it, or remove top_logprobs")
        return value

    @field_validator("messages")
    @classmethod
    def _string_is_a_user_message(cls, value):
        return [ChatMessage(role="user", content=value)] if isinstance(value, str) else value


CompletionPrompt = Union[
    str,
    Annotated[List[str], Field(min_length=1)],
    Annotated[List[TokenId], Field(min_length=1)],
    Annotated[List[Annotated[List[TokenId], Field(min_length=1)]], Field(min_length=1)],
]


class CompletionRequest(SamplingFields):
    prompt: CompletionPrompt = Field(description="text, texts, token ids, or lists of token ids; "
                                                 "text is encoded without a chat template")
    max_completion_tokens: Optional[int] = Field(None, ge=0, description="LMDeploy's name of max_tokens")
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS,
                                    description="log-probabilities of the chosen and this many top tokens")
    echo: Optional[bool] = Field(False, description="the prompt comes first in each choice's text (and "
                                                    "its log-probabilities, with logprobs)")
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N, description="samples per prompt; the n with the "
                                                                     "highest mean token log-probability are returned")
    suffix: Optional[str] = Field(None, description="text after the insertion point: not supported")
    add_special_tokens: Optional[bool] = Field(True, description="vLLM's: false encodes text prompts without BOS")


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
    request_output_len: Optional[int] = Field(None, ge=0, description="default: up to the session length")
    max_tokens: Optional[int] = Field(None, ge=0, description="alias of request_output_len")
    top_p: float = Field(0.8, gt=0, le=1)
    top_k: int = Field(40, ge=-1)
    temperature: float = Field(0.8, ge=0, le=2)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    skip_special_tokens: Optional[bool] = True
    cancel: bool = Field(False, description="abort the session's running turn (nothing else is done)")
    seed: Optional[Int64] = None
    adapter_name: Optional[str] = Field(None, description="LMDeploy's LoRA adapter: tidemind serves none")

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


class ToolCallFunction(BaseModel):
    name: str
    arguments: str = Field(description="a JSON object, serialized")


class ToolCallResponse(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ToolCallDelta(ToolCallResponse):
    index: int


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = Field("", description="null when the answer is only tool calls")
    tool_calls: Optional[List[ToolCallResponse]] = None


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
    tool_calls: Optional[List[ToolCallDelta]] = Field(None, description="each call whole, in one delta")


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
    """With echo, the prompt's tokens come first; its first token has null log-probabilities."""

    tokens: List[str] = Field(default_factory=list)
    token_logprobs: List[Optional[float]] = Field(default_factory=list)
    top_logprobs: List[Optional[Dict[str, float]]] = Field(default_factory=list)
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
