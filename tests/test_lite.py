"""`tidemind lite calibrate | auto_awq | smooth_quant` and `tidemind eval ppl`.

Tiny random models (tests/model_factory.py) get SmolLM2's tokenizer (their vocabulary is sized to
it) so that every command runs whole in seconds; the slow tests run the bundled SmolLM2 with a
small calibration (4 windows of 128 tokens).
"""
from __future__ import annotations

import glob
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from model_factory import PagedKV, hf_logits, make_hf_model, run_step, write_internlm2_from_llama
from quant_factory import dense_state_from_awq
from tidemind.chat.tokenizer import Tokenizer
from tidemind.cli.main import main
from tidemind.config import EngineConfig
from tidemind.eval.ppl import ModelSpec, evaluate, eval_windows
from tidemind.lite.data import calibration_windows, load_text
from tidemind.lite.groups import apply_scale, input_channel_map, layer_groups
from tidemind.lite.layerwise import LayerRunner
from tidemind.loader import load_model, resolve_model

CPU = torch.device("cpu")
SMOL_VOCAB = 49152
CALIB = ["--calib-samples", "4", "--calib-seqlen", "64", "--batch-size", "3", "--device", "cpu"]


@pytest.fixture(scope="module")
def smollm2_path() -> str:
    return resolve_model("smollm2-135m").path


def tiny_model(arch: str, path: str, tokenizer_dir: str, seed: int = 0, **overrides):
    """A tiny random HF model with SmolLM2's tokenizer; returns the HF model."""
    hf = make_hf_model(arch, path, seed=seed, vocab_size=SMOL_VOCAB, **overrides)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tokenizer_dir, name), path)
    return hf


def logits_of(path: str, toks) -> torch.Tensor:
    model, config = load_model(path, torch.float32, CPU)
    return run_step(model, PagedKV(config, num_blocks=16), [(0, toks)])[0]


def run_cli(capsys, *argv) -> tuple:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---- calibration ---------------------------------------------------------------------------------


def test_layer_by_layer_statistics_match_a_whole_model_forward(tmp_path, smollm2_path, capsys):
    model_dir, work = str(tmp_path / "tiny"), str(tmp_path / "work")
    tiny_model("llama", model_dir, smollm2_path, seed=1)
    code, _, err = run_cli(capsys, "lite", "calibrate", model_dir, "--work-dir", work, *CALIB)
    assert code == 0, err
    stats = torch.load(os.path.join(work, "inputs_stats.pth"))
    # the same windows through the whole model on the engine's paged path, hooks on every linear
    tokenizer = Tokenizer.from_pretrained(model_dir)
    windows = calibration_windows(tokenizer.encode(load_text("war-and-peace")[0], add_bos=False), [], 4, 64)
    model, config = load_model(model_dir, torch.float32, CPU)
    seen = {}
    hooks = [module.register_forward_pre_hook(lambda _m, args, name=name: seen.setdefault(name, []).append(args[0]))
             for name, module in model.named_modules() if name.endswith("_proj")]
    kv = PagedKV(config, num_blocks=80)
    for i, window in enumerate(windows):
        run_step(model, kv, [(i, window.tolist())])
    for hook in hooks:
        hook.remove()
    assert set(stats["absmax"]) == set(seen) and len(seen) == 3 * 4
    for name, inputs in seen.items():
        x = torch.cat(inputs)  # [4 * 64 tokens, in_features]
        for stat, expected in (("absmax", x.abs().amax(0)), ("absmean", x.abs().mean(0)), ("min", x.amin(0)),
                               ("max", x.amax(0))):
            torch.testing.assert_close(stats[stat][name], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_scaling_keeps_the_float_layer(arch, tmp_path, smollm2_path):
    # every scale group (norm -> qkv, v -> o with GQA, norm -> gate/up, up -> down) folds 1/s into its
    # producer and s into the weights: the layer computes the same function
    model_dir = str(tmp_path / arch)
    tiny_model(arch, model_dir, smollm2_path, seed=2)
    model, _ = load_model(model_dir, torch.float32, CPU)
    layer = model.model.layers[0]
    runner = LayerRunner(model, seq_len=16, batch_size=2, device=CPU)
    states = torch.randn(2, 16, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    before = states.clone()
    runner.run(layer, before)
    gen = torch.Generator().manual_seed(1)
    for group in layer_groups(layer):
        in_features = layer.get_submodule(group.linears[0]).input_size
        channel_map = input_channel_map(layer, group, in_features)
        size = in_features if channel_map is None else int(channel_map.max()) + 1
        apply_scale(layer, group, torch.rand(size, generator=gen) * 3 + 0.2, channel_map)
    after = states.clone()
    runner.run(layer, after)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


# ---- auto_awq ------------------------------------------------------------------------------------


def test_auto_awq_writes_a_standard_awq_checkpoint(tmp_path, smollm2_path, capsys):
    import transformers

    model_dir, work = str(tmp_path / "tiny"), str(tmp_path / "awq")
    hf = tiny_model("llama", model_dir, smollm2_path, seed=3)
    code, _, err = run_cli(capsys, "lite", "auto_awq", model_dir, "--work-dir", work, "--w-group-size", "32",
                           "--search-scale", *CALIB)
    assert code == 0, err
    with open(os.path.join(work, "config.json")) as f:
        config = json.load(f)
    assert config["quantization_config"] == {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
                                             "version": "gemm", "modules_to_not_convert": None}
    tensors = {}
    for shard in glob.glob(os.path.join(work, "*.safetensors")):
        tensors.update(load_file(shard))
    assert tensors["model.layers.0.self_attn.k_proj.qweight"].shape == (64, 48 // 8)  # [in, out / 8] int32
    assert tensors["model.layers.0.self_attn.k_proj.scales"].dtype == torch.float16
    # an independent reader (tests/quant_factory.py) dequantizes it into a float checkpoint that
    # transformers runs: tidemind's loader must read the same model from the packed files
    config.pop("quantization_config")
    reader = transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).float().eval()
    reader.load_state_dict(dense_state_from_awq(tensors, 32))
    toks = list(range(100, 124))
    ours = logits_of(work, toks)
    torch.testing.assert_close(ours, hf_logits(reader, toks), rtol=0, atol=1e-4)
    # and it is a 4-bit version of the float model: close, not equal
    ref = hf_logits(hf, toks)
    cosine = torch.nn.functional.cosine_similarity(ours, ref, dim=-1)
    # seen: 0.987 .. 0.991 per position (weights N(0, 0.08) in int4 groups of 32: ~10% noise each)
    assert 0.95 < cosine.min() < 0.99999, cosine


@pytest.fixture(scope="module")
def smollm2_quantized(tmp_path_factory, smollm2_path):
    """AWQ (scale exponent 0.5: the search itself is exercised on the tiny model, it costs minutes
    here), RTN and SmoothQuant copies of SmolLM2 calibrated on 4 windows of 64 tokens, and their
    scores on 2 windows of 256 tokens against the float model (about 100 s on 2 cores)."""
    root = tmp_path_factory.mktemp("smollm2-quant")
    calib = ["--calib-samples", "4", "--calib-seqlen", "64", "--device", "cpu"]
    runs = {"awq": ["auto_awq", "--w-group-size", "64", *calib],
            "rtn": ["auto_awq", "--w-group-size", "64", "--rtn"], "w8a8": ["smooth_quant", *calib]}
    for name, argv in runs.items():
        assert main(["lite", argv[0], "smollm2-135m", "--work-dir", str(root / name), *argv[1:]]) == 0
    tokenizer = Tokenizer.from_pretrained(smollm2_path)
    windows = eval_windows(tokenizer.encode(load_text("wikitext2")[0], add_bos=False), [], 256, 512)
    config = EngineConfig(device="cpu")
    results = evaluate([ModelSpec(str(root / name), config, name) for name in runs], windows,
                       ModelSpec(smollm2_path, config, "float"))
    return {r.model: r for r in results}


@pytest.mark.slow
def test_awq_smollm2_is_close_to_float_and_better_than_rtn(smollm2_quantized):
    awq, rtn = smollm2_quantized["awq"], smollm2_quantized["rtn"]
    # seen: AWQ KL 0.22, top-1 78%, ln(PPL ratio) +0.18; RTN KL 0.40, top-1 67%, +0.29
    assert awq.kl_mean < 0.8 * rtn.kl_mean and awq.top1_agreement > rtn.top1_agreement
    assert awq.top1_agreement > 0.72 and math.log(awq.perplexity / awq.reference_perplexity) < 0.25


@pytest.mark.slow
def test_smooth_quant_smollm2_is_close_to_float(smollm2_quantized):
    w8a8 = smollm2_quantized["w8a8"]
    # seen: KL 0.015, top-1 92%, ln(PPL ratio) +0.005
    assert w8a8.kl_mean < 0.03 and w8a8.top1_agreement > 0.9
    assert abs(math.log(w8a8.perplexity / w8a8.reference_perplexity)) < 0.03


def test_smooth_quant_tiny_gemma3_reloads(tmp_path, smollm2_path, capsys):
    model_dir, work = str(tmp_path / "tiny"), str(tmp_path / "w8a8")
    hf = tiny_model("gemma3", model_dir, smollm2_path, seed=4)
    code, _, err = run_cli(capsys, "lite", "smooth_quant", model_dir, "--work-dir", work, "--alpha", "0.6", *CALIB)
    assert code == 0, err
    tensors = load_file(glob.glob(os.path.join(work, "model-00001-*.safetensors"))[0])
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert tensors["model.layers.0.mlp.up_proj.scale"].shape == (96, 1)
    toks = list(range(200, 220))
    cosine = torch.nn.functional.cosine_similarity(logits_of(work, toks), hf_logits(hf, toks), dim=-1)
    assert cosine.min() > 0.995, cosine  # seen: 0.9991 (int8 weights and activations)


# ---- eval ppl ------------------------------------------------------------------------------------


def test_eval_ppl_is_the_mean_next_token_nll(tmp_path, smollm2_path, capsys):
    model_dir = str(tmp_path / "tiny")
    tiny_model("llama", model_dir, smollm2_path, seed=5)
    out = str(tmp_path / "ppl.json")
    code, stdout, err = run_cli(capsys, "eval", "ppl", model_dir, "--reference", model_dir, "--seq-len", "32",
                                "--max-tokens", "100", "--output", out, "--device", "cpu")
    assert code == 0, err
    with open(out) as f:
        result = json.load(f)
    assert result["windows"] == 3 and result["predicted_tokens"] == 3 * 31
    assert result["kl_mean"] < 1e-9 and result["top1_agreement"] == 1.0 and "perplexity" in stdout
    # the same windows scored directly: -log p(t[i+1] | t[..i]) over positions 0 .. 30 of each window
    tokenizer = Tokenizer.from_pretrained(model_dir)
    windows = eval_windows(tokenizer.encode(load_text("wikitext2")[0], add_bos=False), [], 32, 100)
    nll = []
    for window in windows.tolist():
        logp = torch.log_softmax(logits_of(model_dir, window), -1)
        nll += [-logp[i, window[i + 1]].item() for i in range(31)]
    assert result["perplexity"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)


# ---- bad input -------------------------------------------------------------------------------------


@pytest.fixture
def tiny_dir(tmp_path, smollm2_path) -> str:
    path = str(tmp_path / "tiny")
    tiny_model("llama", path, smollm2_path, seed=6)
    return path


@pytest.mark.parametrize("argv,message", [
    (["auto_awq", "--w-group-size", "48"], "model.layers.0.self_attn.qkv_proj: group size 48 does not divide the "
                                           "layer's 64 input features"),
    (["auto_awq", "--w-bits", "3"], "--w-bits 3: tidemind's AWQ quantizes to 4 bits"),
    (["calibrate", "--calib-dataset", "missing/calib.txt"], "text file 'missing/calib.txt' does not exist"),
    (["calibrate", "--calib-dataset", "c4"], "unknown data set 'c4'; pass a UTF-8 text file or one of: war-and-peace"),
    (["smooth_quant", "--alpha", "1.5"], "--alpha 1.5 must lie in [0, 1]"),
    (["calibrate", "--calib-samples", "0"], "--calib-samples must be >= 1"),
])
def test_bad_lite_input_fails_before_any_work(tiny_dir, tmp_path, capsys, argv, message):
    work = str(tmp_path / "work")
    code, _, err = run_cli(capsys, "lite", argv[0], tiny_dir, "--work-dir", work, *argv[1:])
    assert code == 2 and message in err, err
    assert not os.path.exists(work)


def test_lite_refuses_unsupported_and_quantized_models(tmp_path, smollm2_path, capsys):
    llama = tiny_model("llama", str(tmp_path / "llama"), smollm2_path, seed=7, head_dim=None, mlp_bias=False)
    write_internlm2_from_llama(llama, str(tmp_path / "internlm2"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(smollm2_path, name), tmp_path / "internlm2")
    code, _, err = run_cli(capsys, "lite", "auto_awq", str(tmp_path / "internlm2"), "--rtn",
                           "--work-dir", str(tmp_path / "w"))
    assert code == 2 and "tidemind lite quantizes LlamaForCausalLM" in err and "InternLM2ForCausalLM" in err
    code, _, err = run_cli(capsys, "lite", "auto_awq", str(tmp_path / "llama"), "--rtn", "--w-group-size", "32",
                           "--work-dir", str(tmp_path / "awq"))
    assert code == 0, err
    code, _, err = run_cli(capsys, "lite", "smooth_quant", str(tmp_path / "awq"), "--work-dir", str(tmp_path / "w"))
    assert code == 2 and "is already quantized (quant_method='awq')" in err


@pytest.mark.parametrize("quant_policy,max_kl", [("8", 1e-4), ("4", 0.1)])
def test_eval_ppl_with_a_quantized_kv_cache_against_the_unquantized_one(tiny_dir, tmp_path, capsys, quant_policy,
                                                                         max_kl):
    out = str(tmp_path / "ppl.json")
    code, _, err = run_cli(capsys, "eval", "ppl", tiny_dir, "--quant-policy", quant_policy, "--reference", tiny_dir,
                           "--seq-len", "32", "--max-tokens", "64", "--output", out, "--device", "cpu")
    assert code == 0, err
    with open(out) as f:
        result = json.load(f)
    # the KV cache's rounding moves the distributions a little (int4 more), never nothing
    assert 0 < result["kl_mean"] < max_kl and result["top1_agreement"] > 0.8, result
