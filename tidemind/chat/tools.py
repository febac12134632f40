"""Tool calling in the Hermes format (the one ChatML models such as Qwen 2.5 and SmolLM2's family are
trained on, and what tidemind writes for templates with no tool format of their own):

    system prompt:   the tool definitions as JSON lines inside <tools></tools>, with how to call them
    a call:          <tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>   (one block per call)
    a tool result:   a user turn <tool_response>\\n...\\n</tool_response>

A model whose own chat template writes <tool_call> (Qwen 2.5's) renders the tools and the calls
itself (HFChatTemplate with tools=); any other template gets the text above in its messages.

Parsing keeps only blocks whose body is a JSON object with a "name" (and "arguments" or
"parameters"): anything else stays answer text, so the calls a client sees always hold valid JSON.
``tool_call_grammar`` builds the grammar that forces calls (tool_choice "required" or a named
function), each call's arguments constrained by that function's JSON schema (no arguments beyond
the declared ones, unless the schema says additionalProperties).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL_BLOCK = re.compile(re.escape(CALL_OPEN) + r"\s*(.*?)\s*" + re.escape(CALL_CLOSE), re.S)


@dataclass
class ToolCall:
    name: str
    arguments: str  # a JSON object, serialized (OpenAI's form)
    id: str = ""

    def __post_init__(self):
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"

    def openai(self, index: Optional[int] = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def tools_system_prompt(tools: Sequence[Mapping]) -> str:
    """The system-prompt text that offers `tools` (OpenAI tool objects) in the Hermes format."""
    lines = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return ("# Tools\n\nYou may call one or more functions to help with the user's request. The functions are "
            f"described inside <tools></tools>:\n<tools>\n{lines}\n</tools>\n\nTo call a function, answer with a "
            "JSON object holding its name and arguments inside <tool_call></tool_call> tags, one block per call:\n"
            f'{CALL_OPEN}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{CALL_CLOSE}')


def format_call(name: str, arguments) -> str:
    """One call block as the model writes it. arguments: a JSON string or an object."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            pass  # kept as the string it is
    return f"{CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{CALL_CLOSE}"


def hermes_messages(messages: Sequence[Mapping], tools: Sequence[Mapping]) -> List[Dict]:
    """Messages with tools, assistant calls and tool results written out as Hermes text, for chat
    templates without a tool format of their own. Messages are OpenAI-style dicts."""
    out: List[Dict] = []
    offer = tools_system_prompt(tools) if tools else None
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = [format_call(c["function"]["name"], c["function"].get("arguments", "{}"))
                     for c in message["tool_calls"]]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + calls)})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if offer is not None:
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{offer}"}
        else:
            out.insert(0, {"role": "system", "content": offer})
    return out


def _as_call(body: str) -> Optional[ToolCall]:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except ValueError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name=data["name"], arguments=json.dumps(arguments, ensure_ascii=False))


def parse_tool_calls(text: str) -> Tuple[Optional[str], List[ToolCall]]:
    """(the answer text without the call blocks, or None when nothing else is left; the calls)."""
    calls: List[ToolCall] = []
    kept: List[str] = []
    position = 0
    for match in _CALL_BLOCK.finditer(text):
        call = _as_call(match.group(1))
        if call is None:
            continue  # not a valid call: it stays in the text
        calls.append(call)
        kept.append(text[position:match.start()])
        position = match.end()
    if not calls:
        return text, []
    kept.append(text[position:])
    return "".join(kept).strip() or None, calls


class ToolCallStream:
    """Splits a streamed answer into text deltas and whole calls, as the text arrives.

    Text that could be the start of CALL_OPEN is held back until it is not; a call block is held
    until CALL_CLOSE arrives, then sent as a call (or, when its body is no call, as text)."""

    def __init__(self):
        self._buffer = ""
        self.num_calls = 0

    def feed(self, text: str) -> Tuple[str, List[ToolCall]]:
        """(text to send now, calls completed by this delta)."""
        self._buffer += text
        out_text, calls = [], []
        while True:
            start = self._buffer.find(CALL_OPEN)
            if start < 0:
                keep = _partial_prefix(self._buffer, CALL_OPEN)
                out_text.append(self._buffer[:len(self._buffer) - keep])
                self._buffer = self._buffer[len(self._buffer) - keep:]
                break
            end = self._buffer.find(CALL_CLOSE, start)
            if end < 0:
                out_text.append(self._buffer[:start])
                self._buffer = self._buffer[start:]
                break
            block_end = end + len(CALL_CLOSE)
            call = _as_call(self._buffer[start + len(CALL_OPEN):end].strip())
            out_text.append(self._buffer[:start] if call else self._buffer[:block_end])
            if call:
                calls.append(call)
            self._buffer = self._buffer[block_end:]
        self.num_calls += len(calls)
        return "".join(out_text), calls

    def finish(self) -> str:
        """What is still held back (an unfinished block or a partial tag): plain text after all."""
        rest, self._buffer = self._buffer, ""
        return rest


def _partial_prefix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper start of `tag`."""
    for length in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def _declared_arguments(function: Mapping) -> dict:
    """A function's parameters schema for a forced call: only the declared arguments (a schema that
    does not say additionalProperties would let a model invent more, as small ones do)."""
    schema = dict(function.get("parameters") or {"type": "object"})
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


MAX_FORCED_CALLS = 4  # a forced answer holds at most this many calls (a small model may repeat itself)


def tool_call_grammar(tools: Sequence[Mapping], name: Optional[str] = None, parallel: bool = True) -> str:
    """A Lark grammar (llguidance's dialect) for answers made only of call blocks: one call to the
    function `name`; or calls to any of `tools`, up to MAX_FORCED_CALLS of them when `parallel`."""
    functions = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    schemas = [{"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
                "properties": {"name": {"const": f["name"]}, "arguments": _declared_arguments(f)}}
               for f in functions]
    body = json.dumps(schemas[0] if len(schemas) == 1 else {"anyOf": schemas})
    calls = f'call ("\\n" call){{0,{MAX_FORCED_CALLS - 1}}}' if parallel and name is None else "call"
    return f'start: {calls}\ncall: "{CALL_OPEN}\\n" body "\\n{CALL_CLOSE}"\nbody: %json {body}\n'


def prompt_with_tools(template, messages: Sequence[Mapping], tools: Sequence[Mapping]) -> str:
    """The prompt of a conversation that offers `tools`: rendered by the model's own template when it
    writes Hermes tool calls itself (Qwen 2.5's), else with the Hermes text in its messages."""
    if getattr(template, "writes_hermes_tool_calls", False):
        return template.messages2prompt_with_tools(messages, tools)
    return template.messages2prompt(hermes_messages(messages, tools))
