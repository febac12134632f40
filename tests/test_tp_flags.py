"""The tensor-parallel flags on every verb that runs an engine, and what check_env reports about them.
Parsing only (no model is loaded): the engines these flags start are tested in test_tp_engine.py,
test_tp_e2e.py and test_tp_faults.py."""
from __future__ import annotations

import argparse
import importlib

import pytest

from tidemind.cli.main import build_parser, main
from tidemind.config import EngineConfig
from tidemind.config_flags import config_from_args

TP_FLAGS = ["--tp", "2", "--distributed-executor-backend", "ray", "--distributed-timeout", "30",
            "--dist-init-addr", "10.0.0.1:29500"]


def _verb_args(verb, argv):
    """The verb's parsed flags: its own parser for the lazily imported `serve` verbs (cli/lazy.py)."""
    if verb == "chat":
        args, extra = build_parser().parse_known_args(["chat"] + argv)  # as main() parses
        assert not extra
        return args
    module = importlib.import_module({"api_server": "tidemind.serve.openai.launch",
                                      "gradio": "tidemind.serve.gradio_app"}[verb])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("verb", ["chat", "api_server", "gradio"])
def test_engine_verbs_take_the_tensor_parallel_flags(verb):
    config = config_from_args(EngineConfig, _verb_args(verb, TP_FLAGS))
    assert (config.tp, config.distributed_executor_backend, config.distributed_timeout, config.dist_init_addr) == \
        (2, "ray", 30.0, "10.0.0.1:29500")


@pytest.mark.parametrize("flags, message", [
    (["--tp", "0"], "tp=0 must be an integer >= 1"),
    (["--dist-init-addr", "10.0.0.1"], "is not HOST:PORT"),
    (["--distributed-timeout", "0"], "must be > 0 seconds"),
])
def test_bad_tensor_parallel_flags_are_refused_naming_the_fix(flags, message, capsys):
    assert main(["chat"] + flags) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("device, backend", [("cpu", "gloo"), ("cuda", "nccl")])
def test_check_env_names_the_collective_backend_and_whether_tp_fits(device, backend, capsys):
    assert main(["check_env", "--device", device, "--tp", "2"]) == 0
    out = capsys.readouterr().out
    assert f"collective backend    {backend} for --tp > 1 on {device}" in out
    assert "--tp 2" in out and "ray executor" in out
