"""Structured output: response formats as grammars of llguidance (https://github.com/guidance-ai/llguidance),
the grammar engine that constrains decoding (runner/structured_output.py applies its token masks).

A request's grammar travels as its response_format, canonical JSON (SamplingParams.grammar):

    {"type": "json_object"}                                   any JSON object
    {"type": "json_schema", "json_schema": {"schema": {...}}}  OpenAI's structured outputs (strict or not)
    {"type": "regex_schema", "regex_schema": "..."}            LMDeploy's regex form (vLLM: guided_regex)
    {"type": "choice", "choice": ["a", "b"]}                   exactly one of the strings (guided_choice)
    {"type": "grammar", "grammar": "..."}                      a Lark or GBNF grammar (guided_grammar)

JSON is written as json.dumps writes it (", " and ": ", no other whitespace): free whitespace would let a
model spin in blanks until max_tokens. A json_schema / json_object spec may carry "whitespace_pattern"
(vLLM's guided_whitespace_pattern): a regex of the whitespace allowed between tokens instead.
llguidance is imported on first use, so that tidemind runs without it when no request asks for a grammar.
"""
from __future__ import annotations

import json
from typing import Optional

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
INSTALL_HINT = "structured output needs the grammar engine: pip install llguidance (or pip install 'tidemind[serve]')"


class GrammarError(ValueError):
    """A response format whose grammar cannot be compiled; the message says where."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise GrammarError(INSTALL_HINT) from None
    return llguidance


def to_llguidance(spec: dict) -> str:
    """The llguidance grammar of a response_format (checked by config.check_response_format)."""
    llg = _llguidance()
    kind = spec["type"]
    if kind in ("json_object", "json_schema"):
        schema = spec["json_schema"].get("schema", {}) if kind == "json_schema" else {"type": "object"}
        pattern = spec.get("whitespace_pattern")
        options = {"whitespace_pattern": pattern, "whitespace_flexible": True} if pattern else COMPACT_JSON
        return llg.LLMatcher.grammar_from_json_schema(schema if schema is not True else {}, overrides=options)
    if kind == "regex_schema":
        return llg.LLMatcher.grammar_from_regex(spec["regex_schema"])
    if kind == "choice":
        return llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in spec["choice"]))
    if kind == "grammar":
        return llg.grammar_from("grammar", spec["grammar"])
    raise GrammarError(f"response_format type {kind!r} has no grammar")


def compile_spec(spec_json: str) -> str:
    """SamplingParams.grammar (canonical JSON) -> an llguidance grammar, validated; GrammarError says why not."""
    llg = _llguidance()
    try:
        grammar = to_llguidance(json.loads(spec_json))
    except (ValueError, TypeError) as exc:  # llguidance raises ValueError for JSON it cannot read
        raise GrammarError(f"the response format's grammar is invalid: {exc}") from None
    error = llg.LLMatcher.validate_grammar(grammar, None)
    if error:
        raise GrammarError(f"the response format's grammar is invalid: {' '.join(error.split())}")
    return grammar


def check_response_format(response_format: Optional[dict]) -> None:
    """Compile a response_format once, in the caller's thread, so that a bad one is refused before it is
    queued (the runner compiles it again for the request it constrains)."""
    if response_format:
        compile_spec(json.dumps(response_format, sort_keys=True))


def ll_tokenizer(model_path: str, vocab_size: int):
    """llguidance's view of the model's tokenizer (about a second to build: done once per runner).

    vocab_size: the model's logits width, which masks cover (ids past the tokenizer's are never
    allowed). Its EOS is the tokenizer's; which ids may end an answer is the sampler's business."""
    _llguidance()
    import llguidance.hf
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    return llguidance.hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)
