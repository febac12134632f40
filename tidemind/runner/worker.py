"""One tensor-parallel rank: a ModelRunner built for that rank, driven by the executor's calls.

A `Worker` joins the rank's process group (runner/distributed.py), loads its slice of the model and
answers calls: init_kv_cache, capture_graphs, execute (or submit / collect, overlapped), close
(every rank gets every call, in the same order, so their collectives line up). The executor's side
is engine/mp_executor.py (worker processes on this machine, each running runner/worker_loop.py's
serve()) or engine/ray_executor.py (Ray actors, which hold a Worker and call the same methods).

Any exception in a worker ends it: the ranks' states could no longer be trusted to agree, and its
peers would wait for it in a collective. The executor sees the error or the closed socket (a
process that dies closes it), or no answer within its timeout, and stops every rank.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
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
