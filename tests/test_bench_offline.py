"""`tidemind bench latency` / `throughput` end to end on the bundled model (tiny sizes): the table,
the JSON and the plot, and figures that add up."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ENGINE = ["--device", "cpu", "--dtype", "float32", "--session-len", "256", "--no-roofline"]


def _bench(tmp_path, verb, *args):
    out = tmp_path / verb
    result = subprocess.run([sys.executable, "-m", "tidemind.cli.main", "bench", verb, *args, *ENGINE,
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / f"{verb}.png").stat().st_size > 10_000
    return json.loads((tmp_path / f"{verb}.json").read_text()), result.stdout


def test_latency_reports_each_run_and_the_median(tmp_path):
    result, stdout = _bench(tmp_path, "latency", "--input-len", "20", "--output-len", "6", "--num-iters", "2",
                            "--warmup", "0")
    assert (result["input_len"], result["output_len"], len(result["runs"])) == (20, 6, 2)
    for run in result["runs"]:
        assert len(run["itl_ms"]) == 5 and all(ms > 0 for ms in run["itl_ms"])
        assert 0 < run["ttft_s"] < run["total_s"]
    assert result["summary"]["decode_tok_s"] > 0 and "median" in stdout
    assert result["environment"]["model"] == "smollm2-135m" and "reference" in result["environment"]["engine"]


def test_throughput_counts_every_requested_token(tmp_path):
    result, stdout = _bench(tmp_path, "throughput", "--num-prompts", "5", "--input-len", "12", "--output-len", "4",
                            "--warmup", "0")
    summary = result["summary"]
    assert summary["output_tokens"] == 5 * 4 and summary["prompt_tokens"] == 5 * 12
    assert len(result["ttft_s"]) == 5 and result["token_curve"][-1][1] == 20
    assert summary["output_tok_s"] == pytest.approx(20 / summary["wall_s"], rel=0.01)
    assert "output tok/s" in stdout
