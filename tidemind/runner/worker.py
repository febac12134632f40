"""One tensor-parallel rank: a ModelRunner built for that rank, driven by messages from the executor.

A `Worker` joins the rank's process group (runner/distributed.py), loads its slice of the model and
answers calls: init_kv_cache, capture_graphs, execute, close (every rank gets every call, in the
same order, so their collectives line up). The executor's side is engine/mp_executor.py (worker
processes on this machine, this module's main()) or engine/ray_executor.py (Ray actors, which hold
a Worker and call the same methods).

The process loop (serve): the executor starts `python -m tidemind.engine.worker_process --fd N`
(which adds the engine's fault points, engine/faults.py) with one end of a socket pair as fd N.
Messages are pickled tuples:

    executor -> worker   (method, args)             the first is ("init", (WorkerInit,))
    worker -> executor   ("ok", result, seconds)    seconds: the call's time in the worker
                         ("error", traceback text)  the worker exits after sending it

A step ("execute") is answered by rank 0 only (the RunnerOutput); other ranks answer a step only
with an error. Steps overlap inside a worker as they do in one process (executor.py): a rank
prepares and launches step N+1 as soon as it arrives, behind step N on its device, and only then
waits for N's sampled ids and answers N. When no next step has come by the time N's ids are on the
host, N is answered at once (the executor may be waiting for it before it sends another).

Any exception in a worker ends it: the ranks' states could no longer be trusted to agree, and its
peers would wait for it in a collective. The executor sees the error or the closed
socket (a process that dies closes it), or no answer within its timeout, and stops every rank.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable, Optional

from ..config import EngineConfig

logger = logging.getLogger("tidemind")

STARTUP_TIMEOUT_S = 900.0  # the least a start-up phase may take before a rank is declared hung
STARTUP_CALLS = ("init", "init_kv_cache", "capture_graphs")  # Worker calls bounded by startup_timeout()


def startup_timeout(config: EngineConfig) -> float:
    """Seconds a rank may take for a start-up phase; also the ranks' collective timeout (torch.distributed
    sets one per group), since ranks meet in a collective after loading at their own pace. A hang in a
    step is still caught after distributed_timeout: the executor stops every rank then."""
    return max(config.distributed_timeout, STARTUP_TIMEOUT_S)


@dataclass(frozen=True)
class WorkerInit:
    """Everything a rank needs to start (plain data: crosses a process boundary)."""

    rank: int
    size: int
    local_rank: int  # CUDA device index on its machine (0 under Ray, which gives each actor one GPU)
    dist_init_addr: str  # HOST:PORT of rank 0's rendezvous
    model_path: str
    config: EngineConfig
    num_threads: int = 0  # torch CPU threads; 0: torch's default
    log_level: int = logging.WARNING


@dataclass(frozen=True)
class WorkerInfo:
    """What a started rank reports: the engine reads rank 0's."""

    model_config: Any  # config.ModelConfig
    device_type: str
    description: str
    pid: int


class Worker:
    """before_step: called before each step (the engine's fault point of this rank, in tests)."""

    def __init__(self, init: WorkerInit, before_step: Optional[Callable[[], None]] = None):
        import torch

        from .device import checkpoint_dtype, resolve_device, resolve_dtype
        from .distributed import init_tp_group
        from .model_runner import ModelRunner

        self.rank = init.rank
        self._before_step = before_step
        config = init.config
        device = resolve_device(config.device)
        if device.type == "cuda":
            device = torch.device("cuda", init.local_rank)
            torch.cuda.set_device(device)
        if init.num_threads:
            torch.set_num_threads(init.num_threads)
        dtype = resolve_dtype(config.dtype, checkpoint_dtype(init.model_path), device)
        # the collectives' timeout: ranks meet after loading at their own pace (a hang in a step is the
        # executor's to catch, after config.distributed_timeout)
        self.tp_group = init_tp_group(init.rank, init.size, init.dist_init_addr, device, startup_timeout(config))
        self.runner = ModelRunner(init.model_path, device, dtype, config.attention_backend, config.model_format,
                                  tp_group=self.tp_group)
        self._profile = None  # a KernelProfile between start_profile() and stop_profile()
        self.info = WorkerInfo(self.runner.model_config, device.type,
                               f"{device} {str(dtype).replace('torch.', '')}, attention {self.runner.attention.name}, "
                               f"kernels {self.runner.build_context.kernels.name}", os.getpid())

    def init_kv_cache(self, engine_config: EngineConfig, session_len: int, max_batch_size: int):
        return self.runner.init_kv_cache(engine_config, session_len, max_batch_size)

    def capture_graphs(self, max_batch_size: int) -> Optional[float]:
        return self.runner.capture_graphs(max_batch_size)

    def execute(self, scheduled):
        """Run one step to its output (rank 0's RunnerOutput; None on other ranks)."""
        self.submit(scheduled)
        return self.collect()

    def submit(self, scheduled) -> None:
        """Prepare and launch a step behind those not yet collected (at most one may wait)."""
        self.prepare(scheduled)
        self.launch()

    def prepare(self, scheduled) -> None:
        """Apply a step's deltas and send its inputs to the device (submit's first half)."""
        if self._before_step is not None:
            self._before_step()
        self.runner.prepare(scheduled)

    def launch(self) -> None:
        """Start the prepared step on the device (submit's second half)."""
        self.runner.launch()

    def collect(self):
        """The oldest submitted step's output (rank 0's RunnerOutput; None on other ranks)."""
        output = self.runner.collect()
        return output if self.rank == 0 else None

    def oldest_step_ready(self) -> bool:
        return self.runner.oldest_step_ready()

    def start_profile(self) -> None:
        """Record this rank's device kernels until stop_profile() (runner/kernel_profile.py)."""
        from .kernel_profile import KernelProfile

        self._profile = KernelProfile(self.info.device_type)
        self._profile.start()

    def stop_profile(self, top: int = 20) -> dict:
        """The kernels since start_profile(): device busy ms and the `top` kernels' total us."""
        return self._profile.stop(top)

    def step_phases(self) -> dict:
        """Where this rank's step time went: only the process loop (serve) keeps that; {} here."""
        return {}

    def close(self) -> None:
        from .distributed import destroy_tp_group

        self.runner.close()
        destroy_tp_group()


def _configure_logging(rank: int, level: int) -> None:
    # Ranks other than 0 repeat rank 0's start-up lines: they log warnings and errors only.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s tidemind[rank {rank}]: %(message)s",
                                           "%H:%M:%S"))
    logger.handlers[:] = [handler]
    logger.setLevel(level if rank == 0 else max(level, logging.WARNING))
    logger.propagate = False


def _send(conn: Connection, message: tuple) -> None:
    conn.send_bytes(pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL))


POLL_S = 50e-6  # how often a rank waiting for a message also looks whether its oldest step is done


def _next_message_before(conn: Connection, ready: Callable[[], bool]) -> bool:
    """Wait until a message is there to read (True) or, with none there, until ready() (False)."""
    while not conn.poll(POLL_S):
        if ready():
            return conn.poll(0)
    return True


class _DeviceClock:
    """On a GPU, each step's span on the device and the device's idle gap before it: events recorded
    on the stream right before the step's launch (its inputs already sent) and right after. The
    start event fires when the device reaches it: at once if the device had run out of work (the
    gap since the previous step's end is then time it waited for this host), else when the step
    before ends. A span includes any wait inside the step for the host (an eager forward's
    launches) and, under tensor parallelism, for the other ranks in collectives. Nothing on the
    CPU."""

    def __init__(self, device_type: str):
        self.on = device_type == "cuda"
        self.open: list = []  # (start, end) events of the steps not yet collected, oldest first
        self.previous_end = None
        self.span_ms: list = []
        self.gap_ms: list = []

    def start(self):
        if not self.on:
            return None
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def launched(self, start) -> None:
        if self.on:
            self.open.append((start, self.start()))

    def collected(self) -> None:
        if not self.on:
            return
        start, end = self.open.pop(0)
        end.synchronize()
        self.span_ms.append(start.elapsed_time(end))
        if self.previous_end is not None:
            self.gap_ms.append(self.previous_end.elapsed_time(start))
        self.previous_end = end

    def take(self) -> dict:
        """Mean span and median gap, milliseconds a step since the last call (the median: the gaps
        while the engine has no requests would swamp a mean)."""
        times = {}
        if self.span_ms:
            times["device_span"] = round(sum(self.span_ms) / len(self.span_ms), 3)
        if self.gap_ms:
            times["device_gap_median"] = round(sorted(self.gap_ms)[len(self.gap_ms) // 2], 3)
        self.span_ms, self.gap_ms = [], []
        return times


class _SubmittedSteps:
    """The steps a rank has launched and not yet answered, oldest first (at most two: the runner
    holds no more). Rank 0 answers each with its RunnerOutput and the seconds the rank spent on it
    (preparing, launching, collecting); other ranks only collect theirs."""

    def __init__(self, worker: Worker, conn: Connection):
        self.worker, self.conn = worker, conn
        self.host_seconds: list = []  # per waiting step, oldest first
        # seconds spent, over all steps: preparing and launching, collecting (mostly waiting for the
        # device), and between steps (waiting for the next message)
        self.phases = dict(launch=0.0, collect=0.0, idle=0.0)
        self.count = 0
        self.clock = _DeviceClock(worker.info.device_type)

    @property
    def waiting(self) -> bool:
        return bool(self.host_seconds)

    def submit(self, scheduled) -> None:
        start = time.perf_counter()
        self.worker.prepare(scheduled)
        device_start = self.clock.start()
        self.worker.launch()
        self.clock.launched(device_start)
        self.host_seconds.append(time.perf_counter() - start)
        self.phases["launch"] += self.host_seconds[-1]
        self.count += 1
        if len(self.host_seconds) > 1:  # the step before runs ahead of this one on the device: answer it now
            self.answer_oldest()

    def answer_oldest(self) -> None:
        start = time.perf_counter()
        output = self.worker.collect()
        self.clock.collected()
        collected = time.perf_counter() - start
        self.phases["collect"] += collected
        seconds = self.host_seconds.pop(0) + collected
        if self.worker.rank == 0:
            _send(self.conn, ("ok", output, seconds))

    def answer_all(self) -> None:
        while self.waiting:
            self.answer_oldest()

    def take_phases(self) -> dict:
        """Milliseconds a step in each phase since the last call (none: {}), and the device's, and start
        again."""
        phases = {}
        if self.count:
            phases = {name: round(1e3 * seconds / self.count, 3) for name, seconds in self.phases.items()}
            phases.update(self.clock.take())
        self.phases, self.count = dict.fromkeys(self.phases, 0.0), 0
        return phases


def serve(conn: Connection, step_hook: Optional[Callable[[int], Callable[[], None]]] = None) -> int:
    """The worker's loop over the executor's messages; returns the process exit code.
    step_hook(rank): the Worker's before_step."""
    method, (init,) = pickle.loads(conn.recv_bytes())
    if method != "init":
        raise RuntimeError(f"a worker's first message must be init, got {method!r}")
    _configure_logging(init.rank, init.log_level)
    worker = None
    try:
        start = time.perf_counter()
        worker = Worker(init, step_hook(init.rank) if step_hook is not None else None)
        _send(conn, ("ok", worker.info, time.perf_counter() - start))
        steps = _SubmittedSteps(worker, conn)
        while True:
            start = time.perf_counter()
            if steps.waiting and not _next_message_before(conn, worker.oldest_step_ready):
                steps.answer_oldest()  # its ids are on the host and no next step came: the executor may wait
                continue
            try:
                method, args = pickle.loads(conn.recv_bytes())
            except EOFError:  # the executor is gone: nothing left to serve
                return 0
            if method == "execute":
                steps.phases["idle"] += time.perf_counter() - start
                steps.submit(args[0])
                continue
            steps.answer_all()  # every other call comes after the steps sent before it
            start = time.perf_counter()
            result = getattr(worker, method)(*args)
            if method in ("step_phases", "close"):  # where this rank's step time went, since last asked
                result = steps.take_phases()
            _send(conn, ("ok", result, time.perf_counter() - start))
            if method == "close":
                return 0
    except BaseException:
        text = traceback.format_exc()
        logger.error("tensor-parallel rank %d failed:\n%s", init.rank, text)
        try:
            _send(conn, ("error", f"rank {init.rank}: {text}"))
        except OSError:
            pass
        return 1
