"""tools / tool_choice of chat completions: what the prompt offers, what the grammar forces, and how
an answer becomes `tool_calls` (chat/tools.py holds the Hermes format itself).

    tool_choice   prompt offers the tools   grammar                         answer parsed for calls
    none          no                        -                               no
    auto          yes                       -                               yes (invalid blocks stay text)
    required      yes                       calls to any tool               yes
    {function}    yes                       calls to that function          yes

With parallel_tool_calls=false at most one call is made (forced) or kept (auto).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

from ...chat.tools import ToolCall, ToolCallStream, parse_tool_calls, prompt_with_tools, tool_call_grammar
from .errors import OpenAIError
from .protocol import ChatCompletionRequest


@dataclass
class ToolPlan:
    tools: List[Dict[str, Any]]  # OpenAI tool objects, as given
    choice: str  # "auto", "required" or "named"
    name: Optional[str]  # the named function
    parallel: bool

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def response_format(self) -> Optional[dict]:
        """The grammar that forces the calls (None for auto)."""
        if not self.forced:
            return None
        return {"type": "grammar", "grammar": tool_call_grammar(self.tools, self.name, self.parallel)}

    def prompt(self, template, messages: List[Dict[str, Any]]) -> str:
        return prompt_with_tools(template, messages, self.tools)

    def split(self, text: str) -> Tuple[Optional[str], List[ToolCall]]:
        content, calls = parse_tool_calls(text)
        if not self.parallel:
            calls = calls[:1]
        return content, calls


def plan_tools(body: ChatCompletionRequest) -> Optional[ToolPlan]:
    """The request's ToolPlan; None when no tools are in play (none given, or tool_choice "none")."""
    choice = body.tool_choice
    if not body.tools:
        if choice not in (None, "none", "auto"):
            raise OpenAIError(400, "tool_choice asks for a tool call but no tools are given: add tools",
                              param="tool_choice")
        return None
    if choice == "none":
        return None
    tools = [tool.model_dump(exclude_none=True, include={"type", "function"}) for tool in body.tools]
    names = [tool["function"]["name"] for tool in tools]
    name = None
    if not isinstance(choice, (str, type(None))):
        name = choice.function.name
        if name not in names:
            raise OpenAIError(400, f"tool_choice names the function {name!r}, which is not among the tools "
                                   f"({', '.join(names)})", param="tool_choice")
    kind = "named" if name else (choice or "auto")
    return ToolPlan(tools=tools, choice=kind, name=name, parallel=body.parallel_tool_calls is not False)


class ChoiceToolStream:
    """One streamed choice's text split into content deltas and whole tool calls (calls are sent
    only once they are complete and valid JSON)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.stream = ToolCallStream()
        self.calls_sent = 0
        self._blank = ""  # whitespace held back: sent only if more text (not a call) follows it

    def feed(self, text: str, finished: bool) -> Tuple[str, List[dict]]:
        """(content to send, tool-call deltas to send) for a text delta; `finished`: its last one.
        Whitespace around calls is not content (as in the non-streamed answer, whose text is stripped)."""
        content, calls = self.stream.feed(text)
        if finished:
            content += self.stream.finish()
        content, self._blank = ("", self._blank + content) if not content.strip() else (self._blank + content, "")
        if finished and not self.calls_sent and not calls:
            content, self._blank = content + self._blank, ""
        deltas = []
        for call in calls:
            if self.plan.parallel or self.calls_sent == 0:
                deltas.append(call.openai(index=self.calls_sent))
                self.calls_sent += 1
        return content, deltas
