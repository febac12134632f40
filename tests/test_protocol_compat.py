"""The request bodies real clients send are accepted by the server's models, unknown fields are judged by
the policy (ignored and logged once, or refused with --strict-fields), the extension fields map to
tidemind's settings, and the Hermes tool-call format is written, parsed and streamed as documented.
No model and no server: milliseconds.

Fixtures (tests/fixtures/clients/): LMDeploy's APIClient 0.17.0 and 0.3.0 (recorded from the wheels by
record_lmdeploy.py), guidellm 0.8.1's streaming requests (from its source), LangChain's ChatOpenAI
(langchain-openai 1.7.4, recorded by record_langchain.py)."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tidemind.chat.tools import (MAX_FORCED_CALLS, ToolCallStream, format_call, hermes_messages, parse_tool_calls,
                                 tool_call_grammar)
from tidemind.serve.openai.chat_tools import ChoiceToolStream, plan_tools
from tidemind.serve.openai.errors import OpenAIError
from tidemind.serve.openai.extensions import (UnknownFieldPolicy, refuse_unsupported, response_format_of,
                                              unknown_fields)
from tidemind.serve.openai.protocol import ChatCompletionRequest, CompletionRequest, InteractiveRequest

CLIENTS = Path(__file__).parent / "fixtures" / "clients"
MODELS = {"/v1/chat/completions": ChatCompletionRequest, "/v1/completions": CompletionRequest,
          "/v1/chat/interactive": InteractiveRequest}


def recorded_requests():
    for path in sorted(CLIENTS.glob("*.json")):
        data = json.loads(path.read_text())
        for number, request in enumerate(data["requests"]):
            yield pytest.param(request, id=f"{path.stem}-{number}-{request['method']}")


@pytest.mark.parametrize("request_", list(recorded_requests()))
def test_every_recorded_client_body_is_accepted_with_nothing_unknown_left(request_):
    body = MODELS[request_["path"]].model_validate(request_["body"])
    left = [(path, value) for path, value in unknown_fields(body) if value not in (None, {}, [], "")]
    assert left == []  # so --strict-fields takes these clients too
    if isinstance(body, ChatCompletionRequest):
        refuse_unsupported(body)
        plan_tools(body)
        response_format_of(body)


def test_unknown_fields_are_logged_once_per_name_or_refused_when_strict(caplog):
    body = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi", "reasoning_content": "x"}], "frobnicate": 3,
         "kwargs": {}, "nothing": None, "stream_options": None})
    assert sorted(path for path, _ in unknown_fields(body)) == ["frobnicate", "kwargs", "messages[].reasoning_content",
                                                                "nothing"]
    with caplog.at_level(logging.WARNING, logger="tidemind"):
        policy = UnknownFieldPolicy(strict=False)
        policy.check(body)
        policy.check(body)
    assert caplog.text.count("'frobnicate' is not known") == 1 and "kwargs" not in caplog.text
    with pytest.raises(OpenAIError) as caught:
        UnknownFieldPolicy(strict=True).check(body)
    assert caught.value.status == 400 and "'frobnicate'" in caught.value.message
    assert "--strict-fields" in caught.value.message and "kwargs" not in caught.value.message
    UnknownFieldPolicy(strict=True).check(ChatCompletionRequest.model_validate(
        {"messages": "hi", "kwargs": {}, "logit_bias": None, "top_logprobs": 0}))  # empty values: accepted


def test_the_names_remembered_for_logging_are_bounded(caplog):
    from tidemind.serve.openai.extensions import MAX_LOGGED_NAMES

    policy = UnknownFieldPolicy(strict=False)
    with caplog.at_level(logging.WARNING, logger="tidemind"):
        for i in range(MAX_LOGGED_NAMES + 50):
            policy.check(ChatCompletionRequest.model_validate({"messages": "hi", f"field_{i}": 1}))
    assert len(caplog.records) == MAX_LOGGED_NAMES + 1 and "not logged" in caplog.records[-1].getMessage()


@pytest.mark.parametrize("fields, expected", [
    ({"response_format": {"type": "json_object"}}, {"type": "json_object"}),
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"},
                                                                  "strict": True}}},
     {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "object"}}}),
    ({"response_format": {"type": "regex_schema", "regex_schema": "[0-9]+"}},
     {"type": "regex_schema", "regex_schema": "[0-9]+"}),
    ({"guided_json": '{"type": "object"}'}, {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}),
    ({"guided_json": {"type": "object"}, "guided_whitespace_pattern": "[ ]?"},
     {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}, "whitespace_pattern": "[ ]?"}),
    ({"response_format": {"type": "json_object"}, "guided_whitespace_pattern": "[ ]?"},
     {"type": "json_object", "whitespace_pattern": "[ ]?"}),
    ({"guided_regex": "a+", "guided_whitespace_pattern": "[ ]?"}, {"type": "regex_schema", "regex_schema": "a+"}),
    ({"guided_choice": ["yes", "no"]}, {"type": "choice", "choice": ["yes", "no"]}),
    ({"guided_grammar": 'start: "x"'}, {"type": "grammar", "grammar": 'start: "x"'}),
    ({"structured_outputs": {"choice": ["a"]}}, {"type": "choice", "choice": ["a"]}),
    ({"structured_outputs": {"json": {"type": "array"}}},
     {"type": "json_schema", "json_schema": {"schema": {"type": "array"}}}),
])
def test_structured_output_spellings_map_to_one_response_format(fields, expected):
    assert response_format_of(ChatCompletionRequest.model_validate({"messages": "hi", **fields})) == expected


def test_guided_whitespace_pattern_reaches_the_json_grammar():
    from tidemind.chat.grammar import to_llguidance

    body = ChatCompletionRequest.model_validate({"messages": "hi", "guided_json": {"type": "object"},
                                                 "guided_whitespace_pattern": "[ ]?"})
    grammar = json.loads(to_llguidance(response_format_of(body)))
    assert grammar["grammars"][0]["json_schema"]["x-guidance"]["whitespace_pattern"] == "[ ]?"


@pytest.mark.parametrize("fields, param", [
    ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice"),
    ({"guided_json": "[1, 2]"}, "guided_json"),
    ({"adapter_name": "lora-1"}, "adapter_name"),
    ({"use_beam_search": True}, "use_beam_search"),
    ({"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": False}, "add_generation_prompt"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": {"type": "function",
                                                                                    "function": {"name": "g"}}},
     "tool_choice"),
])
def test_what_cannot_be_served_is_a_400_naming_the_field(fields, param):
    body = ChatCompletionRequest.model_validate({"messages": "hi", **fields})
    with pytest.raises(OpenAIError) as caught:
        refuse_unsupported(body)
        response_format_of(body)
        plan_tools(body)
    assert caught.value.status == 400 and caught.value.param == param


def test_completions_refuse_a_suffix_and_take_lmdeploys_max_completion_tokens():
    body = CompletionRequest.model_validate({"prompt": "x", "max_completion_tokens": 16, "suffix": None})
    refuse_unsupported(body)
    assert body.max_completion_tokens == 16 and body.max_tokens is None
    with pytest.raises(OpenAIError, match="suffix"):
        refuse_unsupported(CompletionRequest.model_validate({"prompt": "x", "suffix": "end"}))


# ---------------------------------------------------------------------------------------- tools
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]


def test_tool_calls_are_parsed_and_invalid_blocks_stay_text():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\nnot json\n</tool_call>\n<tool_call>{"name": "add", "parameters": "{\\"a\\": 1}"}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}), ("add", {"a": 1})]
    assert content == "Let me check.\n\n<tool_call>\nnot json\n</tool_call>"
    assert parse_tool_calls("no calls here") == ("no calls here", [])
    assert parse_tool_calls(format_call("f", '{"x": 1}'))[0] is None


def test_streamed_calls_come_whole_and_text_is_held_only_while_it_may_open_one():
    text = 'Sure. <tool_call>\n{"name": "add", "arguments": {"a": [1, 2]}}\n</tool_call> done <tool_ca'
    stream, sent_text, calls = ToolCallStream(), "", []
    for i in range(0, len(text), 3):  # three characters at a time
        delta_text, delta_calls = stream.feed(text[i:i + 3])
        sent_text += delta_text
        calls += delta_calls
        assert "<tool_call>" not in sent_text
    assert sent_text == "Sure.  done " and stream.finish() == "<tool_ca"
    assert [json.loads(c.arguments) for c in calls] == [{"a": [1, 2]}]


def test_choice_stream_drops_the_whitespace_around_calls_and_numbers_them():
    body = ChatCompletionRequest.model_validate({"messages": "hi", "tools": TOOLS, "tool_choice": "required"})
    stream = ChoiceToolStream(plan_tools(body))
    calls = '\n'.join(format_call("add", {"a": i}) for i in range(2))
    contents, deltas = [], []
    for piece, last in ((calls[:30], False), (calls[30:], False), ("\n", True)):
        content, new = stream.feed(piece, last)
        contents.append(content)
        deltas += new
    assert "".join(contents) == "" and [d["index"] for d in deltas] == [0, 1]
    assert all(json.loads(d["function"]["arguments"]) == {"a": i} for i, d in enumerate(deltas))


def test_forced_call_grammars_compile_and_name_the_functions():
    import llguidance

    for name, parallel in ((None, True), ("get_weather", True), (None, False)):
        grammar = tool_call_grammar(TOOLS, name, parallel)
        assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(grammar), None) == ""
        assert ('"add"' in grammar) == (name is None)
        assert (f"{{0,{MAX_FORCED_CALLS - 1}}}" in grammar) == (name is None and parallel)


def test_hermes_messages_offer_the_tools_and_replay_calls_and_results():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    out = hermes_messages(messages, TOOLS)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.\n\n# Tools")
    assert json.dumps(TOOLS[0]) in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": format_call("get_weather", {"city": "Oslo"})}
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}


HERMES_TEMPLATE = ("{%- if tools %}<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>{% endif %}"
                   "{% for m in messages %}<|{{ m.role }}|>{{ m.content or '' }}{% for c in m.tool_calls or [] %}"
                   "<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}{% endfor %}"
                   "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_a_template_that_writes_hermes_calls_renders_tools_itself(tmp_path):
    """Qwen 2.5's kind of template: tools= goes to it, and earlier calls' arguments as objects."""
    from transformers import AutoTokenizer

    from model_factory import save_tiny_tokenizer
    from tidemind.chat.templates import HFChatTemplate
    from tidemind.chat.tokenizer import Tokenizer
    from tidemind.chat.tools import prompt_with_tools

    save_tiny_tokenizer(str(tmp_path))
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    hf.chat_template = HERMES_TEMPLATE
    template = HFChatTemplate(Tokenizer(hf))
    assert template.writes_hermes_tool_calls
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    prompt = prompt_with_tools(template, messages, TOOLS)
    assert prompt.startswith("<tools>") and '"name": "get_weather"' in prompt
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' in prompt
    assert prompt.endswith("<|tool|>sunny<|assistant|>")
