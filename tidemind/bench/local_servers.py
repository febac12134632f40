"""Real tidemind servers (api_server, proxy) as child processes on loopback, for the reliability
suite (`tidemind bench reliability`) and the tests (tests/serve_fixtures.py builds on this).

A server runs `python -m tidemind.cli.main ...` with this interpreter, in the current directory
(so a checkout runs its own code), with its output in a log file whose tail is part of the error
when it does not start.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

import httpx

PathLike = Union[str, Path]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metrics(url: str, timeout: float = 10.0) -> Dict[str, float]:
    """Unlabelled samples of a server's /metrics, plus labelled ones as 'name{label=value}'."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", timeout=timeout).text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def stop(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """Terminate a server process (kill it if it has not exited within `timeout` seconds)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
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


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS of /proc/PID/status; Linux)."""
    with open(f"/proc/{pid}/status") as f:
        match = re.search(r"^VmRSS:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"process {pid} has no VmRSS (it has exited)")
    return int(match.group(1)) * 1024


class LocalServer:
    """One `tidemind <command...>` child process listening on 127.0.0.1:`port`."""

    def __init__(self, command: Sequence[str], port: int, log_path: Optional[PathLike] = None,
                 env: Optional[Dict[str, str]] = None):
        self.command = list(command)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = Path(log_path) if log_path else None
        self._log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen([sys.executable, "-m", "tidemind.cli.main", *self.command],
                                        stdout=self._log, stderr=subprocess.STDOUT,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_healthy(self, timeout: float = 120.0) -> "LocalServer":
        """Wait for /health to answer 200; on failure the error holds the log's tail."""
        try:
            wait_until_healthy(self.url, self.process, timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n{self.log_tail()}") from None
        return self

    def log_tail(self, chars: int = 3000) -> str:
        if self.log_path is None:
            return ""
        with open(self.log_path, errors="replace") as f:
            return f.read()[-chars:]

    def rss_bytes(self) -> int:
        return rss_bytes(self.pid)

    def stop(self) -> None:
        stop(self.process)
        if self.log_path:
            self._log.close()


@contextlib.contextmanager
def started(command: Sequence[str], port: int, log_path: Optional[PathLike] = None,
            env: Optional[Dict[str, str]] = None) -> Iterator[LocalServer]:
    """A server started (not yet ready: call wait_healthy) and stopped when the block ends; start
    several before waiting for any, and they load side by side."""
    server = LocalServer(command, port, log_path, env)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def local_server(command: Sequence[str], port: int, log_path: Optional[PathLike] = None, timeout: float = 120.0,
                 env: Optional[Dict[str, str]] = None) -> Iterator[LocalServer]:
    """Run `tidemind <command...>` (which must listen on `port`) until the block ends, from the
    moment its /health answers."""
    with started(command, port, log_path, env) as server:
        yield server.wait_healthy(timeout)


# Flags every api_server started here gets after its own (`bench reliability --server-arg`).
EXTRA_API_SERVER_ARGS: List[str] = []


def api_server_command(port: int, *extra_args: str, model: Optional[str] = None) -> List[str]:
    """`serve api_server` on 127.0.0.1:`port`, float32 on the CPU (the model's reference precision)."""
    return ["serve", "api_server", *([model] if model else []), "--server-name", "127.0.0.1",
            "--server-port", str(port), "--device", "cpu", "--dtype", "float32", *extra_args,
            *EXTRA_API_SERVER_ARGS]


@contextlib.contextmanager
def local_api_server(*extra_args: str, model: Optional[str] = None, log_path: Optional[PathLike] = None,
                     timeout: float = 120.0, env: Optional[Dict[str, str]] = None) -> Iterator[LocalServer]:
    """A `tidemind serve api_server` on a free loopback port (bundled SmolLM2 unless `model`); `env`
    adds environment variables (e.g. TIDEMIND_INJECT_FAULTS)."""
    port = free_port()
    with local_server(api_server_command(port, *extra_args, model=model), port, log_path, timeout, env) as server:
        yield server
