"""Tensor parallelism on one machine: one worker process per rank (`--distributed-executor-backend mp`,
the default at tp > 1).

Each rank is a fresh interpreter, `python -m tidemind.engine.worker_process --fd N`, like
multiprocessing's spawn start method (nothing forked: CUDA and threads stay sound) but without
re-running the caller's __main__, so pipeline() works in a script without a main guard and in a
notebook. It imports the same tidemind as this process (its directory leads PYTHONPATH) and talks
to the executor over its end of a socket pair (runner/worker_loop.py has the messages). Rank r uses
CUDA device r of those visible; ranks meet at dist_init_addr (default: loopback, a free port).

Per step: the SchedulerOutput is pickled once and its bytes written to every rank's socket (one
message each); rank 0 alone answers. A rank's death shows as its socket closing (EOF), which the
wait for the answer sees at once; a watcher thread per process (waiting on the process itself)
sees a death while no step runs and tells the failure listeners.
"""
from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection, wait
from typing import Dict, List, Sequence

from ..config import EngineConfig
from ..core.outputs import SchedulerOutput
from .distributed_executor import DistributedExecutor, rank_list

logger = logging.getLogger("tidemind")

LOOPBACK = "127.0.0.1"  # where the ranks of one machine meet unless dist_init_addr says otherwise
_KILL_GRACE_S = 5.0  # a rank told to stop (SIGTERM) gets this long before SIGKILL


def worker_env() -> Dict[str, str]:
    import tidemind

    from ..runner.distributed import WORKER_ENV_DEFAULTS

    env = {**WORKER_ENV_DEFAULTS, **os.environ}
    root = os.path.dirname(os.path.dirname(os.path.abspath(tidemind.__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def resolved_device_type(config: EngineConfig) -> str:
    import torch

    if config.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return config.device


def exit_text(code: int) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class MultiprocessExecutor(DistributedExecutor):
    kind = "mp"

    def _start(self, model_path: str, config: EngineConfig) -> list:
        from ..runner.distributed import free_port
        from ..runner.worker import WorkerInit

        device_type = resolved_device_type(config)
        self._check_devices(device_type)
        address = config.dist_init_addr or f"{LOOPBACK}:{free_port(LOOPBACK)}"
        # CPU ranks share this machine's cores; on GPUs torch's default thread count stays
        threads = config.num_threads or (max(1, (os.cpu_count() or 1) // self.size) if device_type == "cpu" else 0)
        level = logging.getLogger("tidemind").getEffectiveLevel()
        self.procs: List[subprocess.Popen] = []
        self.conns: List[Connection] = []
        env = worker_env()
        for rank in range(self.size):
            ours, theirs = socket.socketpair()
            with theirs:
                # ranks > 0 load in silence: one loading bar (rank 0's), as at tp 1
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "tidemind.engine.worker_process", "--fd", str(theirs.fileno())],
                    pass_fds=(theirs.fileno(),), env={**env, "TQDM_DISABLE": "1"} if rank else env))
            self.conns.append(Connection(ours.detach()))
            self._send(rank, ("init", (WorkerInit(rank, self.size, rank, address, model_path, config, threads,
                                                  level),)))
        for rank, proc in enumerate(self.procs):
            threading.Thread(target=self._watch, args=(rank, proc), name=f"tidemind-tp-watch-{rank}",
                             daemon=True).start()
        return [info for info, _ in self._receive(range(self.size), "start-up (loading the model)",
                                                  self.timeout_of("init"))]

    def _check_devices(self, device_type: str) -> None:
        import torch

        if device_type == "cuda" and torch.cuda.device_count() < self.size:
            raise ValueError(f"tp={self.size} runs one rank per GPU but {torch.cuda.device_count()} CUDA device(s) "
                             f"are visible: lower --tp, make more devices visible (CUDA_VISIBLE_DEVICES), or spread "
                             f"the ranks over several machines with --distributed-executor-backend ray")

    # ---- messages ---------------------------------------------------------------------------------
    def _send(self, rank: int, message: tuple) -> None:
        self._send_bytes(rank, pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))

    def _send_bytes(self, rank: int, payload: bytes) -> None:
        try:
            self.conns[rank].send_bytes(payload)
        except OSError:  # its socket is closed: the process is gone
            raise self._fail(f"tensor-parallel rank {rank} {self._exit_of(rank)}") from None

    def _receive(self, ranks: Sequence[int], what: str, timeout_s: float) -> list:
        """(result, seconds) of each rank in `ranks`, in order; any rank's error or death, or a wait
        longer than timeout_s, makes the executor dead."""
        deadline = time.monotonic() + timeout_s
        pending = set(ranks)
        results = {}
        rank_of = {conn: rank for rank, conn in enumerate(self.conns)}
        while pending:
            # every rank's socket but those that answered: an error or EOF from a rank not asked to
            # answer (ranks > 0 in a step) counts too
            watched = [conn for rank, conn in enumerate(self.conns) if rank not in results]
            ready = wait(watched, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise self._fail(f"tensor-parallel rank(s) {rank_list(pending)} did not answer {what} within "
                                 f"{timeout_s:g} s{' (--distributed-timeout)' if timeout_s == self.timeout_s else ''}"
                                 f": a rank hangs (rank 0 answers a step once every rank has done its part)")
            for conn in ready:
                rank = rank_of[conn]
                try:
                    message = pickle.loads(conn.recv_bytes())
                except (EOFError, OSError):
                    raise self._fail(f"tensor-parallel rank {rank} {self._exit_of(rank)}") from None
                if message[0] == "error":
                    first_line = message[1].strip().splitlines()[-1]
                    raise self._fail(f"tensor-parallel rank {rank} failed: {first_line}", message[1])
                results[rank] = message[1:]
                pending.discard(rank)
        return [results[rank] for rank in ranks]

    def _call_all(self, method: str, *args) -> list:
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)
        for rank in range(self.size):
            self._send_bytes(rank, payload)
        return [result for result, _ in self._receive(range(self.size), method, self.timeout_of(method))]

    def _send_step(self, scheduled: SchedulerOutput) -> None:
        payload = pickle.dumps(("execute", (scheduled,)), protocol=pickle.HIGHEST_PROTOCOL)
        for rank in range(self.size):
            self._send_bytes(rank, payload)

    def _receive_step(self) -> tuple:
        return self._receive([0], "a step", self.timeout_s)[0]  # answers come in the order sent

    # ---- processes --------------------------------------------------------------------------------
    def _exit_of(self, rank: int) -> str:
        proc = self.procs[rank]
        try:
            code = proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return f"(pid {proc.pid}) closed its connection"
        return f"(pid {proc.pid}) {exit_text(code)}"

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if not self._closing and self.failure is None:
            self._fail(f"tensor-parallel rank {rank} (pid {proc.pid}) {exit_text(code)}")

    def close(self) -> None:
        super().close()
        for conn in self.conns:
            conn.close()

    def _stop_ranks(self, graceful: bool) -> None:
        # Processes only: the engine thread may be waiting on the sockets, which see EOF as they end.
        procs = getattr(self, "procs", [])
        if not graceful:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
        deadline = time.monotonic() + (self.timeout_s if graceful else _KILL_GRACE_S)
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
