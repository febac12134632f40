"""Start real tidemind servers on loopback for tests (bundled SmolLM2 unless told otherwise)."""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from typing import Iterator, List, Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(url: str) -> dict:
    """Unlabelled samples of /metrics, plus labelled ones as 'name{label=value}'."""
    text = httpx.get(f"{url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def stop(process: subprocess.Popen) -> None:
    """Terminate a server process (kill it if it has not exited within 20 s)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_until_healthy(url: str, process: Optional[subprocess.Popen] = None, timeout: float = 120.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server at {url} exited with code {process.returncode} before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"server at {url} was not healthy after {timeout:.0f}s")


@contextlib.contextmanager
def running(command: List[str], port: int, log_path: Optional[str] = None,
            timeout: float = 120.0, env: Optional[dict] = None) -> Iterator[str]:
    """Run `tidemind <command...>` (which must listen on `port`) until the block ends; yields its URL.

    The process's output goes to `log_path` (or is discarded); on failure to start, the log tail is
    part of the error."""
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    process = subprocess.Popen([sys.executable, "-m", "tidemind.cli.main", *command], stdout=log,
                               stderr=subprocess.STDOUT, env=env)
    try:
        try:
            wait_until_healthy(url, process, timeout)
        except (RuntimeError, TimeoutError) as exc:
            tail = open(log_path).read()[-3000:] if log_path else ""
            raise RuntimeError(f"{exc}\n{tail}") from None
        running.process = process  # for tests that watch the process itself (exit codes)
        yield url
    finally:
        stop(process)
        if log_path:
            log.close()


@contextlib.contextmanager
def api_server(*extra_args: str, model: Optional[str] = None, log_path: Optional[str] = None,
               timeout: float = 120.0, env: Optional[dict] = None) -> Iterator[str]:
    """A `tidemind serve api_server` on a free loopback port, float32 on the CPU; `env` adds
    environment variables (e.g. TIDEMIND_INJECT_FAULTS)."""
    port = free_port()
    command = ["serve", "api_server", *([model] if model else []), "--server-name", "127.0.0.1",
               "--server-port", str(port), "--device", "cpu", "--dtype", "float32", *extra_args]
    with running(command, port, log_path, timeout, env) as url:
        yield url
