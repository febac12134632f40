"""What the worker-process and Ray executors share: start-up order, the one-way road to dead, step
timing.

Both drive config.tp ranks, each a runner/worker.Worker, through the same calls in the same order
(every rank gets every call, so their collectives line up): start the ranks (each loads its slice of
the model), init_kv_cache (each rank plans its cache, the ranks agree on the smallest with a MIN
all-reduce, so all hold the same blocks), capture_graphs, then execute() every step: the step's
SchedulerOutput out to every rank, rank 0's RunnerOutput back. Steps overlap (Executor.prepare /
launch / collect): launch() sends a step's contract without waiting, collect() reads the oldest
step's answer, so the engine schedules and sends step N+1 while the ranks run step N (each rank
runs its steps one after the other, so it has N's tokens before it reads N+1). A step that runs
nothing but tells the ranks who left is not sent alone: its departures go with the next step.
Every wait for a rank is bounded: a step (and close) by config.distributed_timeout, a start-up
phase (loading, sizing the cache, capturing graphs: minutes for a large checkpoint) by
startup_timeout(); a rank that exits, raises or misses it makes the executor dead
(ExecutorDeadError, listeners told once) and every rank is stopped: none is left behind. A rank
that dies is seen at once in any phase (its connection closes); the timeouts only bound hangs.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from ..config import EngineConfig
from ..core.outputs import RunnerOutput, SchedulerOutput
from ..runner.worker import STARTUP_CALLS, startup_timeout
from .executor import Executor, ExecutorDeadError

logger = logging.getLogger("tidemind")



@dataclass
class StepTiming:
    """Where a step's time goes, as the engine sees it: the steps' spacing, how long the engine sat
    in collect() for rank 0's answer, and rank 0's own host time on the step (preparing, launching,
    collecting). With steps overlapped, a device-bound step shows the engine waiting; a step bound
    by the host shows it waiting little."""

    steps: int = 0
    waited_s: float = 0.0
    worker_s: float = 0.0
    first_s: float = 0.0  # when the first and the last answer arrived (perf_counter)
    last_s: float = 0.0

    def record(self, waited_s: float, worker_s: float) -> None:
        now = time.perf_counter()
        if not self.steps:
            self.first_s = now
        self.steps += 1
        self.last_s = now
        self.waited_s += waited_s
        self.worker_s += worker_s

    def per_step_ms(self) -> dict:
        """Milliseconds a step: apart (between answers), waited (the engine), worker (rank 0)."""
        n = max(1, self.steps)
        apart = (self.last_s - self.first_s) / max(1, self.steps - 1)
        return dict(apart=round(1e3 * apart, 3), waited=round(1e3 * self.waited_s / n, 3),
                    worker=round(1e3 * self.worker_s / n, 3))


class DistributedExecutor(Executor):
    kind: str  # "mp" or "ray", for the description
    supports_overlap = True

    def __init__(self, model_path: str, config: EngineConfig):
        from ..loader.checkpoint import check_tensor_parallel

        self.size = config.tp
        self.timeout_s = config.distributed_timeout
        self.startup_timeout_s = startup_timeout(config)
        self.timing = StepTiming()
        self._failure: Optional[str] = None
        self._closing = False  # set by close(): ranks ending from then on are expected
        self._lock = threading.Lock()
        self._listeners: List[Callable[[str], None]] = []
        self._prepared: Optional[SchedulerOutput] = None  # by prepare(), sent by launch()
        self._departed: List[int] = []  # finished ids of empty steps, sent with the next step
        self._uncollected = 0  # steps sent whose answers collect() has not read yet
        if self.size > 1:  # refuse a model that does not split before any process starts
            check_tensor_parallel(model_path, self.size, config.model_format)
        start = time.perf_counter()
        infos = self._start(model_path, plain_engine_config(config))
        info = infos[0]
        self.model_config = info.model_config
        self.device_type = info.device_type
        self.worker_pids = [i.pid for i in infos]
        backend = "nccl" if info.device_type == "cuda" else "gloo"
        self.description = f"{info.description}, tp {self.size} ({backend}, {self.kind} workers)"
        logger.info("%d tensor-parallel ranks (%s executor, %s) ready in %.1f s", self.size, self.kind, backend,
                    time.perf_counter() - start)

    # ---- what a backend provides ------------------------------------------------------------------
    @abstractmethod
    def _start(self, model_path: str, config: EngineConfig) -> list:
        """Start every rank (each loads its slice of the model); their WorkerInfos in rank order."""

    @abstractmethod
    def _call_all(self, method: str, *args) -> list:
        """Call a Worker method on every rank; their results in rank order (raise ExecutorDeadError)."""

    @abstractmethod
    def _send_step(self, scheduled: SchedulerOutput) -> None:
        """Send one step to every rank, without waiting."""

    @abstractmethod
    def _receive_step(self) -> tuple:
        """The oldest sent step's answer: (rank 0's RunnerOutput, its seconds in execute)."""

    @abstractmethod
    def _stop_ranks(self, graceful: bool) -> None:
        """End every rank: graceful after a close() they all answered, else killed at once."""

    def timeout_of(self, method: str) -> float:
        """How long a call of `method` may wait for the ranks (see the module docstring)."""
        return self.startup_timeout_s if method in STARTUP_CALLS else self.timeout_s

    # ---- the Executor interface -------------------------------------------------------------------
    def init_kv_cache(self, engine_config: EngineConfig, session_len: int, max_batch_size: int):
        specs = self._call_all("init_kv_cache", plain_engine_config(engine_config), session_len, max_batch_size)
        if len({spec.num_blocks for spec in specs}) != 1:  # init_kv_cache agrees on the least; never expected
            raise self._fail(f"the ranks sized different KV caches: {[spec.num_blocks for spec in specs]} blocks")
        return specs[0]

    def capture_graphs(self, max_batch_size: int) -> Optional[float]:
        seconds = self._call_all("capture_graphs", max_batch_size)[0]
        if seconds is not None:
            self.description += ", CUDA graphs"
        return seconds

    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        self.prepare(scheduled)
        self.launch()
        return self.collect()

    def prepare(self, scheduled: SchedulerOutput) -> None:
        if self._departed:
            scheduled = dataclasses.replace(scheduled, finished_request_ids=self._departed
                                            + list(scheduled.finished_request_ids))
            self._departed = []
        if scheduled.is_empty:  # only departures: they go with the next step
            self._departed = list(scheduled.finished_request_ids)
            self._prepared = None
            return
        self._prepared = scheduled

    def launch(self) -> None:
        scheduled, self._prepared = self._prepared, None
        if scheduled is None:
            return
        if self._failure is not None:
            raise ExecutorDeadError(self._failure)
        self._send_step(scheduled)
        self._uncollected += 1

    def collect(self) -> RunnerOutput:
        if not self._uncollected:
            return RunnerOutput(sampled_token_ids={})
        if self._failure is not None:
            raise ExecutorDeadError(self._failure)
        self._uncollected -= 1
        start = time.perf_counter()
        output, worker_s = self._receive_step()
        self.timing.record(time.perf_counter() - start, worker_s)
        return output

    def close(self) -> None:
        with self._lock:
            was_dead, self._closing = self._failure is not None, True
        graceful = False
        rank_phases = []
        if not was_dead:
            try:
                rank_phases = self._call_all("close")  # each rank's step phases since last asked
                graceful = True
            except ExecutorDeadError:
                pass  # a rank failed while closing: _fail stopped them all
        self._stop_ranks(graceful)
        with self._lock:
            self._failure = self._failure or "the executor was closed"
        if self.timing.steps:
            ms = self.timing.per_step_ms()
            logger.info("tensor-parallel steps: %d, %.3f ms apart; the engine waited %.3f ms a step for rank 0's "
                        "answer, whose host work on it took %.3f ms", self.timing.steps, ms["apart"], ms["waited"],
                        ms["worker"])
        for rank, phases in enumerate(rank_phases):
            if phases:  # ms a step, from runner/worker_loop.py
                logger.info("tensor-parallel rank %d, ms a step: %s", rank,
                            ", ".join(f"{name} {value:.3f}" for name, value in phases.items()))

    def add_failure_listener(self, callback: Callable[[str], None]) -> None:
        self._listeners.append(callback)

    def profile_ranks(self, start: bool, top: int = 20) -> list:
        """Start (start=True) or stop recording every rank's device kernels; stopping returns, per
        rank, its device busy ms and `top` kernels (runner/kernel_profile.py). Both wait for the
        steps in flight: a measuring tool, not for serving."""
        return self._call_all("start_profile") if start else self._call_all("stop_profile", top)

    def rank_step_phases(self) -> list:
        """Per rank, milliseconds a step spent launching, collecting and idle since the last call
        (worker processes keep these; {} for a rank that does not)."""
        return self._call_all("step_phases")

    # ---- failures ---------------------------------------------------------------------------------
    @property
    def failure(self) -> Optional[str]:
        return self._failure

    def _fail(self, reason: str, details: str = "") -> ExecutorDeadError:
        """Mark the executor dead (the first reason wins), stop every rank, tell the listeners once;
        returns the error for the caller to raise."""
        with self._lock:
            first = self._failure is None
            if first:
                self._failure = reason
        if first:
            logger.error("tensor-parallel executor failed: %s%s", reason, f"\n{details}" if details else "")
            self._stop_ranks(graceful=False)
            for callback in list(self._listeners) if not self._closing else ():
                try:
                    callback(reason)
                except Exception:
                    logger.exception("a failure listener of the executor failed")
        return ExecutorDeadError(self._failure)


def plain_engine_config(config: EngineConfig) -> EngineConfig:
    """The EngineConfig itself, without a subclass: LMDeploy's config classes made for pipeline(**kwargs)
    are built at run time and cannot be pickled to a worker by name; their extra arguments only
    matter to the engine."""
    if type(config) is EngineConfig:
        return config
    return EngineConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(EngineConfig)})


def rank_list(ranks: Sequence[int]) -> str:
    return ", ".join(str(r) for r in sorted(ranks))
