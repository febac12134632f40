"""Broken model files give one clear line naming the file and the fix, from `pipeline()` (an
exception) and from `tidemind chat` (one stderr line, exit code 2, no traceback): config.json with
values of the wrong type or not UTF-8, no tokenizer files, a truncated safetensors or GGUF file."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from model_factory import make_hf_model, write_synthetic_gguf
from tidemind import EngineConfig, pipeline

try:
    from test_detokenizer import smollm2_tokenizer_dir
except ImportError:  # run from the repository root
    from tests.test_detokenizer import smollm2_tokenizer_dir


def _set(key, value):
    def damage(model_dir: str) -> str:
        path = os.path.join(model_dir, "config.json")
        config = json.load(open(path))
        config[key] = value
        json.dump(config, open(path, "w"))
        return model_dir
    return damage


def _not_utf8(model_dir: str) -> str:
    path = os.path.join(model_dir, "config.json")
    text = open(path).read().replace('"llama"', '"llamé"')
    open(path, "wb").write(text.encode("latin-1"))
    return model_dir


def _no_tokenizer(model_dir: str) -> str:
    for name in os.listdir(model_dir):
        if name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            os.remove(os.path.join(model_dir, name))
    return model_dir


def _truncated_safetensors(model_dir: str) -> str:
    path = os.path.join(model_dir, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) * 2 // 3])
    return model_dir


def _truncated_gguf(model_dir: str) -> str:
    from transformers import AutoModelForCausalLM

    path = os.path.join(os.path.dirname(model_dir), "truncated.gguf")
    write_synthetic_gguf(AutoModelForCausalLM.from_pretrained(model_dir), path, "llama", {"": "F32"})
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) * 2 // 3])
    return path


# (what is done to a good model directory -> the path to load, the words the one line must hold)
CASES = {
    "hidden_size as a string": (_set("hidden_size", "64"), "config.json: 'hidden_size' must be a positive integer, "
                                                           "not \"64\"; write it without quotes: 64"),
    "num_hidden_layers null": (_set("num_hidden_layers", None), "config.json: 'num_hidden_layers' must be a positive "
                                                                "integer, not null; set it to a positive integer"),
    "a list for a number": (_set("num_attention_heads", [4]), "config.json: 'num_attention_heads' must be a "
                                                              "positive integer, not [4]"),
    "config not UTF-8": (_not_utf8, "config.json is not UTF-8 text (byte 0xe9 at offset"),
    "no tokenizer": (_no_tokenizer, "has no tokenizer: it needs tokenizer.json (or tokenizer.model, or vocab.json "
                                    "with merges.txt)"),
    "truncated safetensors": (_truncated_safetensors, "model.safetensors: Error while deserializing header: "
                                                      "incomplete metadata, file not fully covered; the file is "
                                                      "corrupt or truncated, download or export it again"),
    "truncated GGUF": (_truncated_gguf, "): the file is truncated or corrupt; download or copy it again"),
}


@pytest.fixture(scope="module")
def good_model(request, tmp_path_factory) -> str:
    """A tiny Llama with SmolLM2's tokenizer files (the tokenizer is never reached by these errors
    but for the missing one)."""
    path = str(tmp_path_factory.mktemp("good") / "model")
    make_hf_model("llama", path, seed=3, head_dim=None)
    tokenizer_dir = smollm2_tokenizer_dir(request, tmp_path_factory)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    return path


def broken(good_model: str, tmp_path, case: str) -> str:
    copy = str(tmp_path / "model")
    shutil.copytree(good_model, copy)
    return CASES[case][0](copy)


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_raises_one_line_naming_the_file_and_the_fix(good_model, tmp_path, case):
    path = broken(good_model, tmp_path, case)
    with pytest.raises(ValueError) as caught:
        pipeline(path, backend_config=EngineConfig(device="cpu", dtype="float32"))
    message = str(caught.value)
    assert CASES[case][1] in message and path in message and "\n" not in message, message


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_tidemind_chat_prints_one_line_and_exits_2(good_model, tmp_path, case):
    path = broken(good_model, tmp_path, case)
    done = subprocess.run([sys.executable, "-m", "tidemind.cli.main", "chat", path, "--device", "cpu"],
                          input="hi\n", capture_output=True, text=True, timeout=300)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert len(lines) == 1 and lines[0].startswith("tidemind: error: "), done.stderr
    assert CASES[case][1] in lines[0] and path in lines[0]
