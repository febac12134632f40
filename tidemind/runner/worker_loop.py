"""The process loop of a tensor-parallel worker (engine/mp_executor.py's ranks): a Worker driven by
messages over a socket.

The executor starts `python -m tidemind.engine.worker_process --fd N` (which adds the engine's fault
points, engine/faults.py) with one end of a socket pair as fd N. Messages are pickled tuples:

    executor -> worker   (method, args)             the first is ("init", (WorkerInit,))
    worker -> executor   ("ok", result, seconds)    seconds: the call's time in the worker
                         ("error", traceback text)  the worker exits after sending it

A step ("execute") is answered by rank 0 only (the RunnerOutput); other ranks answer a step only
with an error. Steps overlap inside a worker as they do in one process (engine/executor.py): a rank
prepares and launches step N+1 as soon as it arrives, behind step N on its device, and only then
waits for N's sampled ids and answers N. When no next step has come by the time N's ids are on the
host, N is answered at once (the executor may be waiting for it before it sends another). Every
other call first answers the steps sent before it. "step_phases" (and "close") answer where this
rank's step time went since the last ask: launching, collecting, idle between steps, and on a GPU
the device's span per step and the gap before it.
"""
from __future__ import annotations

import logging
import pickle
import sys
import time
import traceback
from multiprocessing.connection import Connection
from typing import Callable, Optional

from .worker import Worker

logger = logging.getLogger("tidemind")


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
            if method != "step_phases":  # kept by this loop, not by the Worker
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
