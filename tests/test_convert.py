"""`tidemind convert`: the pre-fused directory holds tidemind's parameters as they stand after
loading, loads without name mapping (zero-copy on the CPU in its dtype), and gives the same logits as
the source checkpoint, for every architecture (tiny random models, no download)."""
from __future__ import annotations

import json

import pytest
import torch

from model_factory import hf_logits, make_hf_model, save_tiny_tokenizer, write_internlm2_from_llama
from test_loader import two_chunk_logits
from tidemind.cli.main import main
from tidemind.convert import convert
from tidemind.loader import CheckpointError, load_model
from tidemind.loader.prefused import FORMAT_KEY

CPU = torch.device("cpu")


def _source(arch: str, path: str, seed: int = 22):
    """A tiny random checkpoint with a tokenizer; returns the transformers model it holds."""
    if arch == "internlm2":
        hf = make_hf_model("llama", path + "-llama", seed=seed, mlp_bias=False, head_dim=16)
        write_internlm2_from_llama(hf, path)
    else:
        hf = make_hf_model(arch, path, seed=seed)
    save_tiny_tokenizer(path)
    return hf


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3", "internlm2"])
def test_prefused_directory_loads_the_same_model(arch, tmp_path):
    source = str(tmp_path / "source")
    hf = _source(arch, source)
    result = convert(source, str(tmp_path / "fused"), "float32")
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config[FORMAT_KEY]["name"] == "prefused" and config["torch_dtype"] == "float32"
    assert (tmp_path / "fused" / "tokenizer.json").exists()

    reference, reference_config = load_model(source, torch.float32, CPU)
    fused, fused_config = load_model(str(tmp_path / "fused"), torch.float32, CPU)
    names = [name for name, _ in fused.named_parameters()]
    assert result.num_tensors == len(names)
    assert not any(".q_proj." in n or ".gate_proj." in n for n in names)  # stored merged
    for (name, ours), (_, theirs) in zip(fused.named_parameters(), reference.named_parameters()):
        assert torch.equal(ours, theirs), name
    ids = list(range(3, 21))
    logits = two_chunk_logits(fused, fused_config, ids)
    assert torch.equal(logits, two_chunk_logits(reference, reference_config, ids))
    assert (logits - hf_logits(hf, ids)).abs().max() < 1e-4


def test_prefused_weights_load_into_another_dtype(tmp_path):
    source = str(tmp_path / "source")
    _source("llama", source, seed=3)
    convert(source, str(tmp_path / "fused"), "float32")
    fused, _ = load_model(str(tmp_path / "fused"), torch.float32, CPU)
    as_bfloat16, _ = load_model(str(tmp_path / "fused"), torch.bfloat16, CPU)  # another dtype: copied
    weight = fused.model.layers[0].self_attn.qkv_proj.weight
    weight_bfloat16 = as_bfloat16.model.layers[0].self_attn.qkv_proj.weight
    assert weight.dtype == torch.float32 and weight_bfloat16.dtype == torch.bfloat16
    assert torch.equal(weight.bfloat16(), weight_bfloat16)


def test_damaged_prefused_directories_name_the_fix(tmp_path):
    from safetensors.torch import load_file, save_file

    source = str(tmp_path / "source")
    _source("qwen2", source, seed=4)
    convert(source, str(tmp_path / "fused"), "auto")
    weights = tmp_path / "fused" / "model.safetensors"
    tensors = load_file(str(weights))
    tensors.pop("model.layers.1.mlp.gate_up_proj.weight")
    save_file(tensors, str(weights))
    with pytest.raises(CheckpointError, match="lacks tensors.*gate_up_proj.*convert the original model again"):
        load_model(str(tmp_path / "fused"), torch.float32, CPU)
    config_path = tmp_path / "fused" / "config.json"
    config = json.loads(config_path.read_text())
    config[FORMAT_KEY]["version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="format version 99"):
        load_model(str(tmp_path / "fused"), torch.float32, CPU)


def test_convert_cli_refuses_what_it_cannot_do(tmp_path, capsys):
    source = str(tmp_path / "source")
    _source("llama", source, seed=5)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main(["convert", source, "--dst-path", str(tmp_path / "taken")]) == 2
    assert "not an empty directory" in capsys.readouterr().err
    # 4 attention heads: tp 3 cannot split them (the format itself serves every tp: tensors are whole)
    assert main(["convert", source, "--dst-path", str(tmp_path / "out"), "--tp", "3"]) == 2
    assert "num_attention_heads=4 is not divisible by tp=3" in capsys.readouterr().err
    # LMDeploy 0.3's form: convert MODEL_NAME MODEL_PATH
    assert main(["convert", "llama2", source, "--dst-path", str(tmp_path / "out")]) == 0
    assert "wrote" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "out"), "--dst-path", str(tmp_path / "again")]) == 2
    assert "pre-fused already" in capsys.readouterr().err
    config_path = tmp_path / "source" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()),
                                       "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 32}}))
    assert main(["convert", source, "--dst-path", str(tmp_path / "again")]) == 2
    assert "is quantized (awq)" in capsys.readouterr().err
