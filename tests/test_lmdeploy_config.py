"""LMDeploy's engine configs and CLI flags as scripts and users write them (no model needed, but for
the two quick-start scripts, which are slow).

tests/fixtures/lmdeploy_engine_configs.json holds the fields and defaults of PytorchEngineConfig and
TurbomindEngineConfig in LMDeploy 0.3.0 and 0.18.0 (read from the wheels' lmdeploy/messages.py)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tidemind import EngineConfig, GenerationConfig, PytorchEngineConfig, TurbomindEngineConfig
from tidemind.cli.main import main
from tidemind.config_compat import engine_config_from_kwargs

FIXTURES = Path(__file__).parent / "fixtures"
SCRIPTS = Path(__file__).parent / "lmdeploy_scripts"
ENUM_DEFAULTS = {"QuantPolicy.NONE": 0, "EngineRole.Hybrid": "Hybrid", "MigrationBackend.DLSlime": "DLSlime"}
CLASSES = {"PytorchEngineConfig": PytorchEngineConfig, "TurbomindEngineConfig": TurbomindEngineConfig}


def lmdeploy_defaults():
    configs = json.loads((FIXTURES / "lmdeploy_engine_configs.json").read_text())["configs"]
    for key, fields in configs.items():
        name = key.split("@")[0]
        yield key, CLASSES[name], {k: ENUM_DEFAULTS[v["source"]] if isinstance(v, dict) else v
                                   for k, v in fields.items()}


@pytest.mark.parametrize("key, cls, defaults", list(lmdeploy_defaults()), ids=lambda v: v if isinstance(v, str) else "")
def test_every_lmdeploy_argument_at_its_default_is_accepted(key, cls, defaults):
    defaults.pop("device_type", None)  # LMDeploy's default 'cuda' would ask for a GPU on this machine
    config = cls(**defaults)
    assert isinstance(config, EngineConfig)
    assert config.tp == 1 and config.quant_policy == 0
    # replace() works as on EngineConfig: LMDeploy-only arguments are not stored fields
    assert dataclasses.replace(config, session_len=77).session_len == 77


def test_lmdeploy_names_map_to_tidemind_settings():
    config = PytorchEngineConfig(block_size=32, device_type="cpu", session_len=1024, max_batch_size=8,
                                 cache_max_entry_count=0.5, num_gpu_blocks=10, eager_mode=True)
    assert (config.cache_block_seq_len, config.device) == (32, "cpu")
    assert (config.session_len, config.max_batch_size) == (1024, 8)
    assert (config.cache_max_entry_count, config.num_gpu_blocks, config.eager_mode) == (0.5, 10, True)
    both = PytorchEngineConfig(enable_prefix_caching=False, num_cpu_blocks=8, eviction_type="copy")
    assert (both.enable_prefix_caching, both.num_cpu_blocks) == (False, 8)
    turbo = TurbomindEngineConfig(cache_block_seq_len=16, model_format="hf", quant_policy=0, tp=1)
    assert (turbo.cache_block_seq_len, turbo.model_format) == (16, "hf")
    assert TurbomindEngineConfig(quant_policy=8).quant_policy == 8
    assert PytorchEngineConfig(quant_policy=4).quant_policy == 4


@pytest.mark.parametrize("cls, kwargs, message", [
    (PytorchEngineConfig, {"distributed_executor_backend": "uni"}, "is not one of mp, ray"),
    (TurbomindEngineConfig, {"nnodes": 2}, "distributed_executor_backend='ray'"),
    (TurbomindEngineConfig, {"quant_policy": 3}, "is not one of 0 (none), 4"),
    (PytorchEngineConfig, {"adapters": {"lora": "/path"}}, "LoRA adapters are not supported"),
    (PytorchEngineConfig, {"dp": 2}, "data parallelism is not implemented"),
    (TurbomindEngineConfig, {"use_logn_attn": True}, "log-n attention"),
    (TurbomindEngineConfig, {"rope_scaling_factor": 2.0}, "dynamic NTK RoPE scaling is not implemented"),
    (PytorchEngineConfig, {"device_type": "ascend"}, "cuda or cpu"),
    (PytorchEngineConfig, {"hf_overrides": {"rope_theta": 1}}, "edit the model's config.json"),
])
def test_what_tidemind_cannot_do_is_refused_naming_it(cls, kwargs, message):
    with pytest.raises(ValueError) as caught:
        cls(**kwargs)
    assert message in str(caught.value) and list(kwargs)[0] in str(caught.value)


def test_settings_without_effect_are_logged_once(caplog):
    with caplog.at_level(logging.WARNING, logger="tidemind"):
        PytorchEngineConfig(thread_safe=True, download_dir="/models", revision=None)
        PytorchEngineConfig(thread_safe=True)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("thread_safe=True" in line for line in lines) == 1
    assert any("download_dir='/models'" in line and "never downloads" in line for line in lines)
    assert not any("revision" in line for line in lines)  # LMDeploy's default: nothing to say


def test_an_argument_of_the_other_engine_is_a_type_error():
    with pytest.raises(TypeError, match="block_size"):
        TurbomindEngineConfig(block_size=64)
    with pytest.raises(TypeError, match="frobnicate"):
        engine_config_from_kwargs({"frobnicate": 1})
    assert engine_config_from_kwargs({"tp": 1, "block_size": 16, "use_logn_attn": False}).cache_block_seq_len == 16


def test_model_name_picks_a_builtin_template_as_in_lmdeploy_0_3(caplog):
    from tidemind.api import _template_from_model_name

    assert _template_from_model_name("Llama3", None, None) == "llama3"
    with caplog.at_level(logging.WARNING, logger="tidemind"):
        assert _template_from_model_name("internlm2-chat-7b", None, None) is None
        assert _template_from_model_name("llama3", "chatml", None) == "chatml"
    assert "does not pick the chat template" in caplog.text
    assert TurbomindEngineConfig(model_name="qwen").lmdeploy_model_name == "qwen"


def test_pipeline_takes_lmdeploys_arguments(monkeypatch):
    """pipeline()'s own mapping (the Pipeline it builds is replaced: no model is loaded)."""
    import tidemind.api as api

    built = []
    options = []
    monkeypatch.setattr(api, "Pipeline", lambda *args, **kwargs: built.append(args) or options.append(kwargs))
    api.pipeline("MODEL", tp=1, download_dir=None, block_size=32, session_len=512)
    model_path, backend_config, _, chat_template = built[-1]
    assert options[-1] == {"engine_process": False}  # the engine runs in this process unless asked
    assert model_path == "MODEL" and chat_template is None
    assert (backend_config.cache_block_seq_len, backend_config.session_len, backend_config.tp) == (32, 512, 1)
    api.pipeline("MODEL", "llama3")  # LMDeploy 0.3: pipeline(model_path, model_name)
    assert built[-1][3] == "llama3" and built[-1][1] is None
    api.pipeline("MODEL", model_name="Llama3", backend_config=PytorchEngineConfig(session_len=256))
    assert built[-1][3] == "llama3" and built[-1][1].session_len == 256
    api.pipeline("MODEL", tp=2, distributed_executor_backend="ray")  # tensor parallelism: docs/DISTRIBUTED.md
    assert (built[-1][1].tp, built[-1][1].distributed_executor_backend) == (2, "ray")
    with pytest.raises(ValueError, match="tp=0 must be an integer >= 1"):
        api.pipeline("MODEL", tp=0)
    with pytest.raises(ValueError, match="not both"):
        api.pipeline("MODEL", backend_config=EngineConfig(), tp=1)
    with pytest.raises(TypeError, match="frobnicate"):
        api.pipeline("MODEL", frobnicate=1)


def test_sampling_settings_without_do_sample_are_noted_once(caplog, monkeypatch):
    import tidemind.config as config_module

    monkeypatch.setattr(config_module, "_GREEDY_NOTE_SHOWN", False)
    with caplog.at_level(logging.WARNING, logger="tidemind"):
        GenerationConfig(temperature=0.0, top_p=0.5)  # temperature 0: greedy on purpose, nothing to say
        assert not caplog.records
        legacy = GenerationConfig(temperature=0.8, top_p=0.8, top_k=40)
        GenerationConfig(top_k=10)
    assert legacy.is_greedy
    assert len(caplog.records) == 1 and "top_p=0.8, top_k=40" in caplog.text and "do_sample=True" in caplog.text


# ---------------------------------------------------------------------------------------- CLI
def test_engine_verbs_take_lmdeploy_flags_and_refuse_what_tidemind_cannot_do(capsys, caplog, monkeypatch):
    import tidemind.serve.openai.launch as launch

    def served():  # a refusal that went missing must fail this test, not leave a server running in it
        raise AssertionError("the api_server started serving")

    monkeypatch.setattr(launch, "_server_class", served)
    with caplog.at_level(logging.WARNING, logger="tidemind"):
        assert main(["chat", "--backend", "turbomind", "--tp", "0"]) == 2
    assert "one engine" in caplog.text
    assert "tp=0 must be an integer >= 1" in capsys.readouterr().err
    # the bundled SmolLM2's 9 heads do not split over 2 ranks: refused before any worker starts
    assert main(["serve", "api_server", "--backend", "pytorch", "--tp", "2", "--quant-policy", "8"]) == 2
    assert "num_attention_heads=9 is not divisible by tp=2" in capsys.readouterr().err
    assert main(["serve", "api_server", "--quant-policy", "4", "--model-format", "awq"]) == 2  # a dense model
    assert "--model-format awq was given but" in capsys.readouterr().err
    assert main(["chat", "--model-format", "gptq"]) == 2
    assert "--model-format gptq was given but" in capsys.readouterr().err


@pytest.mark.parametrize("argv, usage", [
    (["chat", "--bogus"], "usage: tidemind chat"),
    (["list", "--bogus"], "usage: tidemind list"),
    (["serve", "api_server", "--bogus"], "usage: tidemind serve api_server"),
    (["convert", "MODEL", "--bogus"], "usage: tidemind convert"),
])
def test_an_unknown_flag_is_answered_with_the_verbs_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and "unrecognized arguments: --bogus" in err


def test_help_lists_the_verbs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for verb in ("chat", "serve", "convert", "bench", "list", "check_env"):
        assert verb in out


# ---------------------------------------------------------------------------------------- scripts
@pytest.mark.slow
@pytest.mark.parametrize("script", ["turbomind_quickstart.py", "pytorch_quickstart.py"])
def test_lmdeploy_quickstart_scripts_run_unchanged_but_for_import_and_model(script):
    """Only the import line and the model path differ from LMDeploy's documented examples."""
    root = Path(__file__).parent.parent
    result = subprocess.run([sys.executable, str(SCRIPTS / script)], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(root)}, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("[Response(text=") and result.stdout.count("Response(text=") == 2
    assert result.stdout.count("finish_reason='stop'") + result.stdout.count("finish_reason='length'") == 2
