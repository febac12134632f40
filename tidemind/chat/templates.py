"""Chat templates: LMDeploy's ChatTemplateConfig, the built-ins, and the model's own Jinja template.

Which template a model gets (``get_chat_template``):

1. an explicit choice: ``--chat-template NAME|FILE.json`` or a ``ChatTemplateConfig``. A config
   whose ``model_name`` is a built-in name changes that built-in's fields (those it sets, i.e.
   the non-None ones); a config with a new ``model_name`` defines a new template from its fields;
2. else the tokenizer's own Jinja template, rendered by transformers exactly as
   ``tokenizer.apply_chat_template(..., add_generation_prompt=True)``; its stop word is the EOS text;
3. else "base": the prompt text as is.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from dataclasses import dataclass
from typing import List, Optional

from .builtin_templates import (BUILTIN_TEMPLATES, CAPABILITIES, ChatTemplate, Messages,
                                build_builtin, normalize_messages)

__all__ = ["ChatTemplate", "ChatTemplateConfig", "HFChatTemplate", "get_chat_template", "list_templates"]

_TEXT_FIELDS = ("system", "meta_instruction", "eosys", "user", "eoh", "assistant", "eoa",
                "tool", "eotool", "separator")


@dataclass
class ChatTemplateConfig:
    """A chat template by fields, as in LMDeploy. Unset (None) fields keep the built-in's value when
    ``model_name`` names a built-in, and are empty otherwise (``meta_instruction`` None: no default
    system prompt)."""

    model_name: str
    system: Optional[str] = None  # written before a system prompt
    meta_instruction: Optional[str] = None  # default system prompt, used when the messages have none
    eosys: Optional[str] = None  # written after a system prompt
    user: Optional[str] = None  # written before a user message
    eoh: Optional[str] = None  # written after a user message ("end of human")
    assistant: Optional[str] = None  # written before an answer; ends the prompt
    eoa: Optional[str] = None  # written after an answer ("end of assistant")
    tool: Optional[str] = None  # written before a tool result
    eotool: Optional[str] = None  # written after a tool result
    separator: Optional[str] = None  # written after eoa, between rounds
    capability: Optional[str] = None  # completion | infilling | chat | python
    stop_words: Optional[List[str]] = None  # strings that end an answer

    def __post_init__(self):
        if not isinstance(self.model_name, str) or not self.model_name:
            raise ValueError("ChatTemplateConfig.model_name must be a non-empty string: a built-in name "
                             f"({', '.join(list_templates())}) to change it, or a new name to define a template")
        for name in _TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"ChatTemplateConfig.{name} must be a string, got {value!r}")
        if self.capability is not None and self.capability not in CAPABILITIES:
            raise ValueError(f"ChatTemplateConfig.capability={self.capability!r} is not one of "
                             f"{', '.join(CAPABILITIES)}")
        if isinstance(self.stop_words, str):
            self.stop_words = [self.stop_words]
        if self.stop_words is not None:
            if not all(isinstance(word, str) and word for word in self.stop_words):
                raise ValueError(f"ChatTemplateConfig.stop_words must be a list of non-empty strings, "
                                 f"got {self.stop_words!r}")
            self.stop_words = list(self.stop_words)

    @property
    def chat_template(self) -> ChatTemplate:
        """The template these fields describe (LMDeploy's name for it)."""
        return _template_from_config(self)

    def to_json(self, file_path: Optional[str] = None) -> str:
        text = json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v is not None},
                          ensure_ascii=False, indent=2)
        if file_path is not None:
            with open(file_path, "w", encoding="utf-8") as f:
                f.write(text + "\n")
        return text

    @classmethod
    def from_json(cls, file_or_string: str) -> "ChatTemplateConfig":
        """Read a JSON file (or a JSON object string) with ChatTemplateConfig's keys."""
        if os.path.isfile(file_or_string):
            source = file_or_string
            with open(file_or_string, encoding="utf-8") as f:
                text = f.read()
        elif file_or_string.lstrip().startswith("{"):
            source, text = "the chat template JSON string", file_or_string
        else:
            raise FileNotFoundError(f"chat template file {file_or_string!r} does not exist")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON: {error.msg} at line {error.lineno}, "
                             f"column {error.colno}") from error
        keys = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(data, dict):
            raise ValueError(f"{source} must hold a JSON object with the keys {', '.join(keys)}; "
                             f"it holds a {type(data).__name__}")
        unknown = sorted(set(data) - set(keys))
        if unknown:
            raise ValueError(f"{source} has unknown key(s) {', '.join(unknown)}; the keys are {', '.join(keys)}")
        if "model_name" not in data:
            raise ValueError(f"{source} needs a \"model_name\": a built-in name ({', '.join(list_templates())}) "
                             "to change that template, or a new name to define one from the other keys")
        try:
            return cls(**data)
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from error


def _template_from_config(config: ChatTemplateConfig) -> ChatTemplate:
    fields = {k: v for k, v in dataclasses.asdict(config).items() if v is not None}
    name = fields.pop("model_name")
    if name.lower() in BUILTIN_TEMPLATES:
        return build_builtin(name.lower(), fields)
    return ChatTemplate(name, **fields)


class HFChatTemplate:
    """The tokenizer's own Jinja template, rendered by transformers (``apply_chat_template``).

    ``tokenizer``: a tidemind Tokenizer or a transformers tokenizer."""

    name = "hf"
    capability = "chat"
    _MARK_USER, _MARK_ANSWER = "TIDEMINDMARKUSER", "TIDEMINDMARKANSWER"

    def __init__(self, tokenizer):
        if tokenizer.chat_template is None:
            raise ValueError("this tokenizer has no chat template; choose one with --chat-template NAME")
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token
        self.stop_words: List[str] = [eos] if eos else []
        specials = tokenizer.convert_ids_to_tokens(tokenizer.all_special_ids)
        specials = sorted((s for s in specials if s), key=len, reverse=True)
        self._leading_special = re.compile(r"\s*(?:%s)" % "|".join(map(re.escape, specials))) if specials else None

    def __repr__(self) -> str:
        return f"HFChatTemplate(stop_words={self.stop_words!r})"

    def messages2prompt(self, messages: Messages, sequence_start: bool = True,
                        template_kwargs: Optional[dict] = None) -> str:
        """``template_kwargs``: extra variables of the Jinja template (e.g. enable_thinking)."""
        chat = [{"role": role, "content": text} for role, text in normalize_messages(messages)]
        if sequence_start:
            return self._render(chat, template_kwargs)
        # A follow-up turn: render it after a marked previous round and keep what follows the
        # marked answer, less the end-of-answer token that the model itself generated.
        marked = [{"role": "user", "content": self._MARK_USER}, {"role": "assistant", "content": self._MARK_ANSWER}]
        full = self._render(marked + chat, template_kwargs)
        if self._MARK_ANSWER not in full:
            raise ValueError("the model's chat template drops earlier assistant answers, so it cannot render "
                             "a follow-up turn; render the whole conversation (sequence_start=True)")
        rest = full[full.rindex(self._MARK_ANSWER) + len(self._MARK_ANSWER):]
        match = self._leading_special.match(rest) if self._leading_special else None
        return rest[match.end():] if match else rest

    @property
    def writes_hermes_tool_calls(self) -> bool:
        """The template renders `tools` and <tool_call> blocks itself (chat/tools.py's format)."""
        source = self.tokenizer.chat_template or ""
        return "tools" in source and "<tool_call>" in source

    def messages2prompt_with_tools(self, messages, tools) -> str:
        """A first turn offering `tools` (OpenAI tool objects); assistant messages may hold tool_calls
        (their arguments are passed as objects, as such templates expect) and tool results."""
        import jinja2

        chat = []
        for message in messages:
            message = dict(message)
            if message.get("tool_calls"):
                message["tool_calls"] = [_call_with_object_arguments(call) for call in message["tool_calls"]]
            chat.append(message)
        try:
            return self.tokenizer.apply_chat_template(chat, tools=list(tools), tokenize=False,
                                                      add_generation_prompt=True)
        except (jinja2.TemplateError, ValueError) as error:
            raise ValueError(f"the model's chat template cannot render these messages with tools: {error}") from error

    def _render(self, chat: list, template_kwargs: Optional[dict] = None) -> str:
        import jinja2

        open_answer = bool(chat) and chat[-1]["role"] == "assistant"
        try:
            return self.tokenizer.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=not open_answer, continue_final_message=open_answer,
                **(template_kwargs or {}))
        except (jinja2.TemplateError, ValueError) as error:
            raise ValueError(f"the model's chat template cannot render these messages: {error}. Fix the "
                             "messages, or pick another template with --chat-template NAME (see `tidemind list`) "
                             "or a JSON file") from error


def _call_with_object_arguments(call: dict) -> dict:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            function["arguments"] = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            pass  # the template gets the string as it came
    return {**call, "function": function}


def list_templates() -> List[str]:
    """Names accepted by ``--chat-template`` (besides a JSON file path)."""
    return sorted(BUILTIN_TEMPLATES)


def get_chat_template(tokenizer=None, name_or_file: Optional[str] = None,
                      config: Optional[ChatTemplateConfig] = None):
    """Pick the chat template (see the module docstring for the order)."""
    if name_or_file is not None and config is not None:
        raise ValueError("pass either a chat template name/file or a ChatTemplateConfig, not both "
                         "(a JSON file holds the same fields as a ChatTemplateConfig)")
    if name_or_file is not None:
        if name_or_file.lower() in BUILTIN_TEMPLATES:
            return build_builtin(name_or_file.lower())
        if os.path.isfile(name_or_file) or name_or_file.endswith(".json"):
            config = ChatTemplateConfig.from_json(name_or_file)
        else:
            raise ValueError(f"unknown chat template {name_or_file!r}; known names: {', '.join(list_templates())}. "
                             "A path to a JSON file with ChatTemplateConfig's keys is also accepted.")
    if config is not None:
        return _template_from_config(config)
    if tokenizer is not None and tokenizer.chat_template is not None:
        return HFChatTemplate(tokenizer)
    return build_builtin("base")
