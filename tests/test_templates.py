"""Chat templates (tidemind/chat/templates.py, builtin_templates.py).

Each built-in is checked two ways: against a literal string written from the family's published
format, and, where the family publishes a Jinja template, against that template rendered by
transformers' own renderer on several conversations (the reference templates below are copied
from the models' tokenizer_config.json files; Qwen's tool-call branches are left out).
"""
import json
import types

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from tidemind.chat.builtin_templates import normalize_messages
from tidemind.chat.templates import (ChatTemplateConfig, HFChatTemplate, get_chat_template,
                                     list_templates)
from tidemind.chat.tokenizer import Tokenizer

try:  # one conversion helper for both test files (tests/ is not a package)
    from test_detokenizer import smollm2_tokenizer_dir
except ImportError:  # tests/ made a package
    from tests.test_detokenizer import smollm2_tokenizer_dir

CHATML_JINJA = (r"{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] "
                r"+ '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                r"{% endif %}")
INTERNLM2_JINJA = "{{ bos_token }}" + CHATML_JINJA
QWEN25_JINJA = r"""{%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}"""
LLAMA3_JINJA = (r"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
                r"'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
                r"'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
                r"{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant"
                r"<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2_JINJA = (r"{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set "
                r"system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set "
                r"system_message = false %}{% endif %}{% for message in loop_messages %}{% if (message['role'] == "
                r"'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                r"user/assistant/user/assistant/...') }}{% endif %}{% if loop.index0 == 0 and system_message != false "
                r"%}{% set content = '<<SYS>>\n' + system_message + '\n<</SYS>>\n\n' + message['content'] %}{% else "
                r"%}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token "
                r"+ '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' '  + "
                r"content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
MISTRAL_V01_JINJA = (r"{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != "
                     r"(loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate "
                     r"user/assistant/user/assistant/...') }}{% endif %}{% if message['role'] == 'user' %}{{ "
                     r"'[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ "
                     r"message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles "
                     r"are supported!') }}{% endif %}{% endfor %}")
GEMMA3_JINJA = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# name -> (official Jinja, bos_token, eos_token, accepts a system message)
OFFICIAL = {
    "chatml": (CHATML_JINJA, "", "<|im_end|>", True),
    "qwen": (QWEN25_JINJA, "", "<|im_end|>", True),
    "internlm2": (INTERNLM2_JINJA, "<s>", "</s>", True),
    "llama3": (LLAMA3_JINJA, "<|begin_of_text|>", "<|eot_id|>", True),
    "llama2": (LLAMA2_JINJA, "<s>", "</s>", True),
    "mistral": (MISTRAL_V01_JINJA, "<s>", "</s>", False),
    "gemma": (GEMMA3_JINJA, "<bos>", "<eos>", True),
}


def sys_(text):
    return {"role": "system", "content": text}


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


MULTI_TURN = [sys_("You are terse."), user("Hi there"), bot("Hello! How can I help?"), user("Tell me a joke.")]
CONVERSATIONS = {
    "one_user": [user("Hi there")],
    "system_user": [sys_("You are terse."), user("Hi there")],
    "multi_turn": MULTI_TURN,
    "no_system_multi_turn": MULTI_TURN[1:],
    "padded": [sys_("  Be brief. \n"), user(" What is 2+2?\n"), bot(" 4 "), user("And 3+3?  ")],
    "open_answer": [user("Finish this"), bot("The answer is")],
    "unicode": [user("你好 🎉 naïve"), bot("¡Hola!"), user("Ça va?")],
}

EXPECTED_MULTI_TURN = {
    "base": "You are terse.\nHi there\nHello! How can I help?\nTell me a joke.",
    "chatml": ("<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
               "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nTell me a joke."
               "<|im_end|>\n<|im_start|>assistant\n"),
    "internlm2": ("<s><|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                  "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nTell me a joke."
                  "<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\nHello! How can I help?<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
               "Tell me a joke.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama2": ("<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHi there [/INST] Hello! How can I help? </s>"
               "<s>[INST] Tell me a joke. [/INST]"),
    "mistral": "<s>[INST] You are terse.\n\nHi there [/INST]Hello! How can I help?</s>[INST] Tell me a joke. [/INST]",
    "gemma": ("<bos><start_of_turn>user\nYou are terse.\n\nHi there<end_of_turn>\n<start_of_turn>model\n"
              "Hello! How can I help?<end_of_turn>\n<start_of_turn>user\nTell me a joke.<end_of_turn>\n"
              "<start_of_turn>model\n"),
    "vicuna": "You are terse. USER: Hi there ASSISTANT: Hello! How can I help?</s>USER: Tell me a joke. ASSISTANT:",
}
EXPECTED_MULTI_TURN["qwen"] = EXPECTED_MULTI_TURN["chatml"]

QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                 "helpful, detailed, and polite answers to the user's questions.")
EXPECTED_STR_PROMPT = {
    "base": "Hi there",
    "chatml": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "qwen": f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "internlm2": "<s><|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "llama3": ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    "llama2": "<s>[INST] Hi there [/INST]",
    "mistral": "<s>[INST] Hi there [/INST]",
    "gemma": "<bos><start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "vicuna": f"{VICUNA_SYSTEM} USER: Hi there ASSISTANT:",
}

SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


@pytest.fixture(scope="session")
def smol_dir(request, tmp_path_factory):
    return smollm2_tokenizer_dir(request, tmp_path_factory)


@pytest.fixture(scope="session")
def smol(smol_dir):
    return Tokenizer.from_pretrained(smol_dir)


def official_render(name, messages):
    jinja, bos, eos, _ = OFFICIAL[name]
    chat = [{"role": role, "content": text} for role, text in normalize_messages(messages)]
    open_answer = chat[-1]["role"] == "assistant"
    rendered, _ = render_jinja_template([chat], chat_template=jinja, add_generation_prompt=not open_answer,
                                        continue_final_message=open_answer, bos_token=bos, eos_token=eos)
    return rendered[0]


# ------------------------------------------------------------------------------------ built-ins
def test_list_templates_has_the_documented_names():
    assert {"base", "llama2", "llama3", "chatml", "qwen", "internlm2", "mistral", "gemma",
            "vicuna"} <= set(list_templates())
    assert list_templates() == sorted(list_templates())


@pytest.mark.parametrize("name", sorted(EXPECTED_MULTI_TURN))
def test_builtin_multi_turn_with_system_literal(name):
    assert get_chat_template(None, name).messages2prompt(MULTI_TURN) == EXPECTED_MULTI_TURN[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_STR_PROMPT))
def test_builtin_str_prompt_literal(name):
    template = get_chat_template(None, name)
    assert template.messages2prompt("Hi there") == EXPECTED_STR_PROMPT[name]
    assert template.messages2prompt([user("Hi there")]) == EXPECTED_STR_PROMPT[name]


@pytest.mark.parametrize("name, conversation", [
    (name, conversation) for name in sorted(OFFICIAL) for conversation in sorted(CONVERSATIONS)
    # Mistral v0.1's official template refuses system messages (ours folds them, see the literal test).
    if OFFICIAL[name][3] or CONVERSATIONS[conversation][0]["role"] != "system"])
def test_builtin_equals_official_jinja(name, conversation):
    messages = CONVERSATIONS[conversation]
    assert get_chat_template(None, name).messages2prompt(messages) == official_render(name, messages)


def test_stop_words_of_builtins():
    assert get_chat_template(None, "chatml").stop_words == ["<|im_end|>"]
    assert get_chat_template(None, "llama3").stop_words == ["<|eot_id|>", "<|end_of_text|>"]
    assert get_chat_template(None, "gemma").stop_words == ["<end_of_turn>"]
    assert get_chat_template(None, "llama2").stop_words == ["</s>"]
    assert get_chat_template(None, "base").stop_words == []


@pytest.mark.parametrize("name", sorted(set(list_templates()) - {"base"}))
def test_follow_up_turn_continues_the_session(name):
    """Prompt of a whole conversation == open first round + the end-of-answer text the model wrote +
    the follow-up turn rendered with sequence_start=False."""
    template = get_chat_template(None, name)
    first_round = template.messages2prompt(MULTI_TURN[:3])
    follow_up = template.messages2prompt(MULTI_TURN[3]["content"], sequence_start=False)
    assert first_round + template.eoa + follow_up == template.messages2prompt(MULTI_TURN)
    assert not follow_up.startswith(("<s>[INST] <<SYS>>", "<|begin_of_text|>", "<bos>"))


def test_follow_up_literals():
    assert get_chat_template(None, "chatml").messages2prompt("More?", sequence_start=False) == \
        "\n<|im_start|>user\nMore?<|im_end|>\n<|im_start|>assistant\n"
    assert get_chat_template(None, "llama2").messages2prompt("More?", sequence_start=False) == "<s>[INST] More? [/INST]"
    # No default system prompt in a follow-up turn.
    assert QWEN_SYSTEM not in get_chat_template(None, "qwen").messages2prompt("More?", sequence_start=False)


def test_message_validation():
    chatml = get_chat_template(None, "chatml")
    parts = [user([{"type": "text", "text": "line one"}, {"type": "text", "text": "line two"}])]
    assert chatml.messages2prompt(parts) == chatml.messages2prompt("line one\nline two")
    with pytest.raises(ValueError, match="image_url"):
        chatml.messages2prompt([user([{"type": "image_url", "image_url": {"url": "x"}}])])
    with pytest.raises(ValueError, match="accepted roles"):
        chatml.messages2prompt([{"role": "robot", "content": "beep"}])
    with pytest.raises(ValueError, match="'role' and 'content'"):
        chatml.messages2prompt(["just a string in a list"])
    with pytest.raises(ValueError, match="only as the first message"):
        get_chat_template(None, "gemma").messages2prompt([user("a"), bot("b"), sys_("late system")])


def test_folded_system_without_user_is_kept():
    prompt = get_chat_template(None, "gemma").messages2prompt([sys_("Only a system prompt")])
    assert prompt == "<bos><start_of_turn>user\nOnly a system prompt\n\n<end_of_turn>\n<start_of_turn>model\n"


# ------------------------------------------------------------------------------------ HF Jinja path
def test_tokenizer_template_is_used_and_equals_apply_chat_template(smol):
    template = get_chat_template(smol)
    assert isinstance(template, HFChatTemplate) and template.stop_words == ["<|im_end|>"]
    for name, messages in CONVERSATIONS.items():
        chat = [{"role": role, "content": text} for role, text in normalize_messages(messages)]
        open_answer = chat[-1]["role"] == "assistant"
        expected = smol.hf_tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=not open_answer, continue_final_message=open_answer)
        assert template.messages2prompt(messages) == expected, name
    assert template.messages2prompt("Hi there") == template.messages2prompt([user("Hi there")])
    # A plain transformers tokenizer works the same way.
    assert get_chat_template(smol.hf_tokenizer).messages2prompt(MULTI_TURN) == template.messages2prompt(MULTI_TURN)


def test_smollm2_template_is_chatml_with_its_system_prompt(smol, tmp_path):
    hf = get_chat_template(smol)
    by_config = get_chat_template(smol, config=ChatTemplateConfig(model_name="chatml", meta_instruction=SMOLLM_SYSTEM))
    path = tmp_path / "smollm.json"
    path.write_text(json.dumps({"model_name": "chatml", "meta_instruction": SMOLLM_SYSTEM}))
    by_file = get_chat_template(smol, str(path))
    for messages in CONVERSATIONS.values():
        assert by_config.messages2prompt(messages) == by_file.messages2prompt(messages) == hf.messages2prompt(messages)
    assert hf.messages2prompt("More?", sequence_start=False) == by_config.messages2prompt("More?", sequence_start=False)
    # Tokenized, the rendered prompt starts with the template's own <|im_start|> and gets no extra BOS.
    ids = smol.encode(hf.messages2prompt("Hi"))
    assert ids[0] == smol.hf_tokenizer.convert_tokens_to_ids("<|im_start|>") and ids[1] != ids[0]


def test_explicit_name_beats_the_tokenizer_template(smol):
    assert get_chat_template(smol, "llama3").name == "llama3"


def test_broken_conversation_for_tokenizer_template_names_the_fix(smol_dir):
    tokenizer = Tokenizer.from_pretrained(smol_dir)
    tokenizer.hf_tokenizer.chat_template = MISTRAL_V01_JINJA
    with pytest.raises(ValueError, match="--chat-template"):
        get_chat_template(tokenizer).messages2prompt([sys_("S"), user("U")])


def test_no_tokenizer_template_falls_back_to_base():
    assert get_chat_template(types.SimpleNamespace(chat_template=None)).name == "base"
    assert get_chat_template().messages2prompt("as is") == "as is"


# ------------------------------------------------------------------------------------ configs / JSON
def test_config_overrides_builtin_fields():
    template = get_chat_template(None, config=ChatTemplateConfig(model_name="chatml", meta_instruction="Be kind."))
    assert template.name == "chatml"
    assert template.messages2prompt("Hi") == ("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi"
                                              "<|im_end|>\n<|im_start|>assistant\n")
    llama3 = ChatTemplateConfig(model_name="llama3", stop_words=["<|eot_id|>"]).chat_template
    assert llama3.stop_words == ["<|eot_id|>"]
    assert llama3.messages2prompt(MULTI_TURN) == EXPECTED_MULTI_TURN["llama3"]  # other fields kept


def test_config_with_new_name_defines_a_template(tmp_path):
    config = ChatTemplateConfig(model_name="my-format", system="### System:\n", eosys="\n\n", user="### User:\n",
                                eoh="\n\n", assistant="### Assistant:\n", eoa="</s>", separator="\n\n",
                                stop_words=["</s>", "###"])
    template = get_chat_template(None, config=config)
    assert template.name == "my-format" and template.stop_words == ["</s>", "###"]
    assert template.messages2prompt(MULTI_TURN) == (
        "### System:\nYou are terse.\n\n### User:\nHi there\n\n### Assistant:\nHello! How can I help?</s>\n\n"
        "### User:\nTell me a joke.\n\n### Assistant:\n")
    assert template.messages2prompt("Hi") == "### User:\nHi\n\n### Assistant:\n"  # no default system prompt
    path = tmp_path / "my.json"
    config.to_json(str(path))
    assert ChatTemplateConfig.from_json(str(path)) == config
    assert get_chat_template(None, str(path)).messages2prompt(MULTI_TURN) == template.messages2prompt(MULTI_TURN)


@pytest.mark.parametrize("content, message", [
    ('{"model_name": "chatml",, }', "not valid JSON: .* line 1"),
    ('["chatml"]', "must hold a JSON object"),
    ('{"model_name": "chatml", "sytem": "x"}', "unknown key.*sytem"),
    ('{"meta_instruction": "x"}', "needs a \"model_name\""),
    ('{"model_name": "chatml", "capability": "dance"}', "capability"),
    ('{"model_name": "chatml", "stop_words": [""]}', "stop_words"),
])
def test_malformed_json_names_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "template.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        get_chat_template(None, str(path))
    assert str(path) in str(error.value)


def test_unknown_name_and_missing_file():
    with pytest.raises(ValueError, match="unknown chat template 'llama9'.*llama3.*JSON file"):
        get_chat_template(None, "llama9")
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        get_chat_template(None, "/nowhere.json")
    with pytest.raises(ValueError, match="not both"):
        get_chat_template(None, "chatml", ChatTemplateConfig(model_name="chatml"))
