"""An api_server whose engine cannot go on (fault injection: a failed step whose recovery fails
too) answers every waiting caller with an error at once, reports 503 on /health and exits with a
non-zero code, so that a supervisor or the proxy notices: never a silent hang."""
from __future__ import annotations

import time

import httpx
import pytest

from serve_fixtures import api_server, running

pytestmark = pytest.mark.slow


def test_a_dead_engine_fails_its_callers_turns_unhealthy_and_exits_non_zero(tmp_path):
    faults = {"TIDEMIND_INJECT_FAULTS": "execute=2,recovery=1"}
    with api_server("--session-len", "512", env=faults, log_path=str(tmp_path / "server.log")) as url:
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
