"""The seam between the engine and the model runner(s).

The engine hands each step's SchedulerOutput to an executor and gets a RunnerOutput back; it never
touches tensors. InProcessExecutor drives one ModelRunner in this process (the default at tp 1);
MultiprocessExecutor (engine/mp_executor.py) drives one worker process per tensor-parallel rank on
this machine, RayExecutor (engine/ray_executor.py) one Ray actor per rank across a cluster: both send
each step's contract to every rank and return rank 0's output (engine/distributed_executor.py).
torch is imported only when an executor is created, so the engine's own modules stay importable
without it.

Overlap (engine.py): an executor with supports_overlap also runs a step in three calls,
prepare(scheduled) -> collect() of the previous step -> launch(), so the host prepares step N+1 while
the device runs step N; execute() is the three in a row.

A failed step of the in-process runner fails that step's requests and the engine goes on. An
executor whose ranks can no longer run (one died, hung past --distributed-timeout, or raised: its
peers' states can no longer be trusted to agree) raises ExecutorDeadError from then on, which the
engine does not contain: the engine thread stops and every caller gets an error (async_engine.py).
It also tells its failure listeners at once, so an idle engine notices a rank that died.
"""
from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Callable, Optional

from ..config import EngineConfig, ModelConfig
from ..core.outputs import RunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    from ..runner.kv_cache import KVCacheSpec

logger = logging.getLogger("tidemind")

BACKENDS = ("mp", "ray")  # EngineConfig.distributed_executor_backend


class ExecutorDeadError(RuntimeError):
    """The executor's ranks cannot run steps any more (a worker died, hung or failed)."""


class Executor(ABC):
    model_config: ModelConfig
    device_type: str  # "cuda" or "cpu": the defaults that depend on the device read it
    description: str  # one line for logs and the chat banner: device, dtype, backends
    supports_overlap: bool = False  # prepare / launch / collect work (the engine may overlap steps)

    @abstractmethod
    def init_kv_cache(self, engine_config: EngineConfig, session_len: int, max_batch_size: int) -> "KVCacheSpec":
        """Size and allocate the KV cache on every device; all ranks get the same number of blocks."""

    @abstractmethod
    def capture_graphs(self, max_batch_size: int) -> Optional[float]:
        """Capture CUDA graphs where they apply; the seconds it took, or None."""

    @abstractmethod
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        ...

    def prepare(self, scheduled: SchedulerOutput) -> None:
        """Apply the step's deltas and send its inputs; the previous step may still run."""
        raise NotImplementedError(f"{type(self).__name__} runs whole steps only (execute)")

    def launch(self) -> None:
        """Start the prepared step; collect() the previous one first."""
        raise NotImplementedError(f"{type(self).__name__} runs whole steps only (execute)")

    def collect(self) -> RunnerOutput:
        """The last launched step's output, once the device has it."""
        raise NotImplementedError(f"{type(self).__name__} runs whole steps only (execute)")

    @abstractmethod
    def close(self) -> None:
        ...

    def add_failure_listener(self, callback: Callable[[str], None]) -> None:
        """Call callback(reason), from any thread, should the executor die on its own (a worker rank
        exiting while no step runs). An in-process executor cannot die apart from its caller."""


class InProcessExecutor(Executor):
    def __init__(self, model_path: str, config: EngineConfig):
        import torch

        from ..runner.device import checkpoint_dtype, resolve_device, resolve_dtype
        from ..runner.model_runner import ModelRunner

        device = resolve_device(config.device)
        if device.type == "cpu" and config.num_threads:
            torch.set_num_threads(config.num_threads)
        dtype = resolve_dtype(config.dtype, checkpoint_dtype(model_path), device)
        logger.info("loading %s on %s in %s", model_path, device, str(dtype).replace("torch.", ""))
        self.runner = ModelRunner(model_path, device, dtype, config.attention_backend, config.model_format)
        self.model_config = self.runner.model_config
        self.device_type = device.type
        self.supports_overlap = True
        self.description = (f"{device} {str(dtype).replace('torch.', '')}, attention "
                            f"{self.runner.attention.name}, kernels {self.runner.build_context.kernels.name}")

    def init_kv_cache(self, engine_config: EngineConfig, session_len: int, max_batch_size: int) -> "KVCacheSpec":
        return self.runner.init_kv_cache(engine_config, session_len, max_batch_size)

    def capture_graphs(self, max_batch_size: int) -> Optional[float]:
        seconds = self.runner.capture_graphs(max_batch_size)
        if seconds is not None:
            self.description += ", CUDA graphs"
        return seconds

    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(scheduled)

    def prepare(self, scheduled: SchedulerOutput) -> None:
        self.runner.prepare(scheduled)

    def launch(self) -> None:
        self.runner.launch()

    def collect(self) -> RunnerOutput:
        return self.runner.collect()

    def close(self) -> None:
        self.runner.close()


def keep_gguf_quantized(model: Optional[str], config: EngineConfig) -> bool:
    """Whether a GGUF `model` runs at its stored precision (runner/gguf_precision.py decides and logs)."""
    from ..runner.gguf_precision import keep_gguf_quantized as decide
    if config.tp > 1:  # the gguf method has no tensor-parallel shards: a GGUF runs dequantized there
        return False
    return decide(model, config.dtype, config.device, config.model_format)


def create_executor(model_path: str, config: EngineConfig) -> Executor:
    """The in-process executor at tp 1 unless a distributed backend is named; else the backend's
    executor ("mp" when none is named)."""
    backend = config.distributed_executor_backend
    if backend is None and config.tp == 1:
        return InProcessExecutor(model_path, config)
    if backend == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(model_path, config)
    from .mp_executor import MultiprocessExecutor

    return MultiprocessExecutor(model_path, config)
