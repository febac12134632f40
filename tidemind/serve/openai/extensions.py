"""What the generating routes do with the fields beyond OpenAI's core: unknown fields (ignored and
logged once per name, or refused with --strict-fields), LMDeploy's and vLLM's extension fields
(structured output in its four spellings, stop ids, bad words, ...), the values tidemind cannot serve
(a 400 naming the field and what to do), and the GenerationConfig a request asks for.
"""
from __future__ import annotations

import logging
import re
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple

from pydantic import BaseModel

from ...config import GenerationConfig
from .errors import OpenAIError
from .generation import generation_config
from .protocol import ChatCompletionRequest, SamplingFields

logger = logging.getLogger("tidemind")

# apply_chat_template's own arguments: a request's chat_template_kwargs may not set them
_RENDER_ARGUMENTS = {"conversation", "tools", "documents", "tokenize", "add_generation_prompt",
                     "continue_final_message", "return_dict", "return_tensors", "chat_template", "tokenizer_kwargs"}
MAX_LOGGED_NAMES = 256  # unknown field names remembered (and logged) per server
STRICT_HINT = "this server runs with --strict-fields, which refuses fields it does not know"


def _is_empty(value: Any) -> bool:
    return value is None or (isinstance(value, (dict, list, str)) and len(value) == 0)


def unknown_fields(model: BaseModel, path: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted path, value) of every field of the body no model knows, nested ones included;
    list indices are written [] so that one name stands for every message that has it."""
    for name, value in (model.model_extra or {}).items():
        yield f"{path}{name}", value
    for name in type(model).model_fields:
        value = getattr(model, name)
        items = value if isinstance(value, list) else [value]
        suffix = "[]" if isinstance(value, list) else ""
        for item in items:
            if isinstance(item, BaseModel):
                yield from unknown_fields(item, f"{path}{name}{suffix}.")


class UnknownFieldPolicy:
    """Unknown fields with a value: logged once per field name, or (strict) refused with a 400.
    Fields with a null or empty value ({}, [], "") ask for nothing: always ignored, silently."""

    def __init__(self, strict: bool):
        self.strict = strict
        self._logged: Set[str] = set()

    def check(self, body: BaseModel) -> None:
        given = [(path, value) for path, value in unknown_fields(body) if not _is_empty(value)]
        if not given:
            return
        if self.strict:
            names = ", ".join(f"'{path}'" for path, _ in given)
            raise OpenAIError(400, f"unknown field(s) {names}: remove them ({STRICT_HINT}; GET /openapi.json "
                                   f"lists the accepted fields)", param=given[0][0].split(".")[0])
        for path, _ in given:
            if path in self._logged or len(self._logged) > MAX_LOGGED_NAMES:
                continue
            self._logged.add(path)
            if len(self._logged) > MAX_LOGGED_NAMES:  # names come from clients: the set stays bounded
                logger.warning("more than %d unknown request field names seen: further ones are not logged",
                               MAX_LOGGED_NAMES)
                continue
            logger.warning("request field %r is not known to tidemind: ignored (logged once per field name; "
                           "--strict-fields refuses such requests)", path)


def _refuse(field: str, message: str) -> OpenAIError:
    return OpenAIError(400, f"{field}: {message}", param=field)


def refuse_unsupported(body: SamplingFields) -> None:
    """400 for extension values asking for what tidemind cannot do (their null/default is fine)."""
    if body.adapter_name:
        raise _refuse("adapter_name", "tidemind serves no LoRA adapters; leave it out (merge the adapter into the "
                                      "model's weights to serve it)")
    if body.use_beam_search:
        raise _refuse("use_beam_search", "beam search is not implemented; sample with n / best_of instead")
    if getattr(body, "suffix", None):
        raise _refuse("suffix", "text insertion (a suffix after the completion) is not supported")
    if isinstance(body, ChatCompletionRequest):
        ends_with_answer = body.messages[-1].role == "assistant"
        if body.add_generation_prompt is False and not ends_with_answer:
            raise _refuse("add_generation_prompt", "false is supported only when the last message is the "
                                                   "assistant's, which the answer then continues")
        if body.continue_final_message and not ends_with_answer:
            raise _refuse("continue_final_message", "the last message must be the assistant's answer to continue")


_FORMS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs")


def response_format_of(body: SamplingFields) -> Optional[dict]:
    """GenerationConfig.response_format from whichever spelling the request used (OpenAI's and
    LMDeploy's response_format, vLLM's guided_* and structured_outputs); at most one may be given.
    guided_whitespace_pattern goes with a JSON form."""
    form = _response_format(body)
    if form is not None and body.guided_whitespace_pattern and form["type"] in ("json_schema", "json_object"):
        form["whitespace_pattern"] = body.guided_whitespace_pattern
    return form


def _response_format(body: SamplingFields) -> Optional[dict]:
    given = [name for name in _FORMS if getattr(body, name) is not None
             and not (name == "response_format" and body.response_format.type == "text")]
    if len(given) > 1:
        raise _refuse(given[1], f"give one structured output form, not {' and '.join(given)}")
    if not given:
        return None
    name = given[0]
    if name == "response_format":
        form = body.response_format
        if form.type == "json_schema":
            schema = form.json_schema.schema_
            return {"type": "json_schema", "json_schema": {"name": form.json_schema.name,
                                                           "schema": {} if schema in (None, True) else schema}}
        return form.model_dump(include={"type", "regex_schema"}, exclude_none=True)
    if name == "structured_outputs":
        return _structured_outputs(body.structured_outputs)
    value = getattr(body, name)
    return {"guided_json": lambda v: {"type": "json_schema", "json_schema": {"schema": _schema(v, name)}},
            "guided_regex": lambda v: {"type": "regex_schema", "regex_schema": v},
            "guided_choice": lambda v: {"type": "choice", "choice": list(v)},
            "guided_grammar": lambda v: {"type": "grammar", "grammar": v}}[name](value)


def _schema(value, field: str) -> dict:
    if isinstance(value, dict):
        return value
    import json

    try:
        schema = json.loads(value)
    except ValueError as exc:
        raise _refuse(field, f"not a JSON schema (a JSON object, or its text): {exc}") from None
    if not isinstance(schema, dict):
        raise _refuse(field, "a JSON schema must be a JSON object")
    return schema


def _structured_outputs(spec) -> dict:
    forms = [key for key in ("json_", "regex", "choice", "grammar", "json_object") if getattr(spec, key)]
    if len(forms) != 1:
        raise _refuse("structured_outputs", "give exactly one of json, regex, choice, grammar, json_object")
    key = forms[0]
    if key == "json_":
        return {"type": "json_schema", "json_schema": {"schema": _schema(spec.json_, "structured_outputs")}}
    if key == "json_object":
        return {"type": "json_object"}
    return {"regex": {"type": "regex_schema", "regex_schema": spec.regex},
            "choice": {"type": "choice", "choice": spec.choice},
            "grammar": {"type": "grammar", "grammar": spec.grammar}}[key]


def logit_bias_of(body: SamplingFields, vocab_size: int) -> Optional[Dict[int, float]]:
    if not body.logit_bias:
        return None
    bias = {}
    for key, amount in body.logit_bias.items():
        if not re.fullmatch(r"\d+", key) or int(key) >= vocab_size:
            raise _refuse("logit_bias", f"key {key!r} is not a token id of this model (0 .. {vocab_size - 1}, "
                                        f"written as a string)")
        bias[int(key)] = amount
    return bias


def request_config(state, body: SamplingFields, prompt_len: int, max_tokens: Optional[int], default_max_tokens: int,
                   logprobs: Optional[int], response_format: Optional[dict], **extra) -> GenerationConfig:
    """The GenerationConfig of a chat or completions request (its template stop words added).
    `extra`: more GenerationConfig fields (prompt_logprobs)."""
    min_new = body.min_new_tokens if body.min_new_tokens is not None else body.min_tokens
    if response_format is not None and (body.ignore_eos or min_new):
        raise _refuse("ignore_eos" if body.ignore_eos else "min_new_tokens",
                      "a structured answer ends when its grammar is complete: leave ignore_eos / min_tokens out")
    config = generation_config(
        max_tokens=max_tokens, default_max_tokens=default_max_tokens,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, stop=body.stop, logprobs=logprobs,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, ignore_eos=body.ignore_eos,
        skip_special_tokens=body.skip_special_tokens, min_new_tokens=min_new,
        stop_token_ids=body.stop_token_ids or None, include_stop_str_in_output=body.include_stop_str_in_output,
        bad_words=body.bad_words or None, logit_bias=logit_bias_of(body, state.pipe.engine.model_config.vocab_size),
        response_format=response_format, **extra)
    return state.pipe.with_template_stops(config)


def check_grammar(response_format: Optional[dict], param: str) -> None:
    """Compile the grammar now: a bad schema or regex is a 400 before anything is queued."""
    from ...chat.grammar import GrammarError, check_response_format

    try:
        check_response_format(response_format)
    except GrammarError as exc:
        raise OpenAIError(400, str(exc), param=param) from None


def structured_param(body: SamplingFields) -> str:
    return next((name for name in _FORMS if getattr(body, name) is not None), "response_format")


def chat_template_kwargs_note(body: ChatCompletionRequest, template, logged: List[bool]) -> Optional[dict]:
    """chat_template_kwargs for the model's own Jinja template; built-in templates have no use for
    them (said once)."""
    if not body.chat_template_kwargs:
        return None
    reserved = sorted(set(body.chat_template_kwargs) & _RENDER_ARGUMENTS)
    if reserved:
        raise _refuse("chat_template_kwargs", f"{', '.join(reserved)} are set by the server, not by the request")
    if getattr(template, "name", None) == "hf":
        return body.chat_template_kwargs
    if not logged:
        logged.append(True)
        logger.warning("chat_template_kwargs are for the model's own Jinja template; the %s template ignores them "
                       "(logged once)", getattr(template, "name", "chosen"))
    return None
