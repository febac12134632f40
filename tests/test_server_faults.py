"""An api_server whose engine cannot go on (fault injection: a failed step whose recovery fails
too; an engine process that is killed) answers every waiting caller with an error at once, reports
503 on /health and exits with a non-zero code, so that a supervisor or the proxy notices: never a
silent hang."""
from __future__ import annotations

import os
import re
import signal
import time

import httpx
import pytest

from serve_fixtures import api_server, running

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("where", ["--no-engine-process", "--engine-process"])
def test_a_dead_engine_fails_its_callers_turns_unhealthy_and_exits_non_zero(tmp_path, where):
    faults = {"TIDEMIND_INJECT_FAULTS": "execute=2,recovery=1"}
    with api_server("--session-len", "512", where, env=faults, log_path=str(tmp_path / "server.log")) as url:
        process = running.process
        assert httpx.get(f"{url}/health").status_code == 200
        start = time.monotonic()
        response = httpx.post(f"{url}/v1/completions", timeout=30,
                              json={"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 16})
        assert response.status_code >= 500 and time.monotonic() - start < 30
        assert "InjectedFault" not in response.text
        # /health is 503 until the server is gone; then nothing answers.
        try:
            health = httpx.get(f"{url}/health", timeout=5)
            assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
        except httpx.TransportError:
            pass  # already shut down
        assert process.wait(timeout=30) == 1
    log = (tmp_path / "server.log").read_text()
    assert "the engine stopped" in log and "InjectedFault" in log  # the detail is in the log


def test_a_killed_engine_process_fails_the_streams_and_the_server_exits(tmp_path):
    log_path = tmp_path / "server.log"
    with api_server("--session-len", "512", "--engine-process", log_path=str(log_path)) as url:
        process = running.process
        engine_pid = int(re.search(r"engine process (\d+) ready", log_path.read_text()).group(1))
        body = {"model": "smollm2-135m", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))  # tokens are flowing
            os.kill(engine_pid, signal.SIGKILL)
            start = time.monotonic()
            rest = [line for line in lines if line.startswith("data: ")]
        assert time.monotonic() - start < 20
        assert any('"internal_error"' in line for line in rest) and rest[-1] == "data: [DONE]", rest[-3:]
        assert process.wait(timeout=30) == 1
    log = log_path.read_text()
    assert "the engine stopped" in log and "killed by SIGKILL" in log  # the detail is in the log
