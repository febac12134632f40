"""Start real tidemind servers on loopback for tests (bundled SmolLM2 unless told otherwise).

The processes are tidemind.bench.local_servers' (shared with `tidemind bench reliability`); these
helpers yield the server's URL."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional

from tidemind.bench.local_servers import (api_server_command, free_port, local_server, metrics, stop,  # noqa: F401
                                          wait_until_healthy)


@contextlib.contextmanager
def running(command: List[str], port: int, log_path: Optional[str] = None,
            timeout: float = 120.0, env: Optional[dict] = None) -> Iterator[str]:
    """Run `tidemind <command...>` (which must listen on `port`) until the block ends; yields its URL.

    The process's output goes to `log_path` (or is discarded); on failure to start, the log tail is
    part of the error."""
    with local_server(command, port, log_path, timeout, env) as server:
        running.process = server.process  # for tests that watch the process itself (exit codes)
        yield server.url


@contextlib.contextmanager
def api_server(*extra_args: str, model: Optional[str] = None, log_path: Optional[str] = None,
               timeout: float = 120.0, env: Optional[dict] = None) -> Iterator[str]:
    """A `tidemind serve api_server` on a free loopback port, float32 on the CPU; `env` adds
    environment variables (e.g. TIDEMIND_INJECT_FAULTS)."""
    port = free_port()
    with running(api_server_command(port, *extra_args, model=model), port, log_path, timeout, env) as url:
        yield url
