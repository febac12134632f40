"""The tensor-parallel process group of a worker: torch.distributed, NCCL on GPUs, gloo on the CPU.

Every rank calls init_tp_group() with the same rendezvous address (host:port of a TCP store that
rank 0 opens; it comes from EngineConfig.dist_init_addr or the executor's choice, never a literal
here) and gets a TorchTPGroup, the layers/parallel.TPGroup whose collectives are torch.distributed's.
The group is the default (world) group: one engine per process, all of its ranks tensor-parallel.

NCCL collectives are enqueued on the current CUDA stream's order (no host sync), so decode steps
captured as CUDA graphs capture them too (the first collectives, which create NCCL's communicator,
run in the capture's warm-up). NVLink multicast (NVLS) stays off on shared machines:
NCCL_NVLS_ENABLE=0 unless the environment says otherwise.

The layers' all-reduces (two a decoder layer) are the collectives a decode step waits on most: on
two H200s NCCL takes ~14 us for one 4,096-wide bf16 row inside a CUDA graph, where torch's
symmetric-memory kernels (each rank reads its peers' buffers over NVLink) take ~6 us
(benchmarks/gpu_allreduce.py). So on GPUs every rank maps one buffer of the largest step's
activations into its peers' address space at start-up (enable_symmetric_all_reduce) and sums through
it: one-shot (one kernel: copy in, every rank reads every buffer) up to 1 MiB at tp 2, two-shot
(reduce-scatter then all-gather) otherwise; NCCL takes what does not fit. Both leave the same bits
on every rank (model_runner.py relies on it). TIDEMIND_TP_ALLREDUCE=nccl keeps NCCL for all.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from ..layers.parallel import TPGroup

logger = logging.getLogger("tidemind")

# Environment every worker process starts with, unless the caller's environment sets them.
WORKER_ENV_DEFAULTS = {"NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}


def collective_backend(device_type: str) -> str:
    """"nccl" for CUDA devices, "gloo" for the CPU."""
    return "nccl" if device_type == "cuda" else "gloo"


def parse_address(address: str) -> Tuple[str, int]:
    """HOST:PORT (checked by EngineConfig) -> (host, port); [v6] brackets dropped."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def free_port(host: str) -> int:
    """A TCP port free on `host` right now (the OS's choice; taken by rank 0's store shortly after)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# One-shot is ahead of two-shot (whose input must first be copied in) up to 128 rows of 4,096 bf16 on two
# H200s, in graphs: 9.3 against 12.4 us at 32 rows, 14.8 against 16.0 at 128, 21.3 against 19.1 at 256
ONE_SHOT_MAX_BYTES = 2**20
SYMMETRIC_MAX_BYTES = 256 * 2**20  # the largest buffer mapped for all-reduces; larger ones go to NCCL
SYMMETRIC_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SymmetricAllReduce:
    """Sums through a buffer of `max_bytes` that every rank maps (torch's symmetric memory over CUDA
    P2P). Construction is collective: every rank of the group must make one at the same point."""

    def __init__(self, group_name: str, size: int, device: torch.device, max_bytes: int,
                 one_shot_max_bytes: int = ONE_SHOT_MAX_BYTES):
        from torch.distributed import _symmetric_memory as symm_mem

        self.group_name, self.max_bytes = group_name, max_bytes
        self.buffer = symm_mem.empty(max_bytes, dtype=torch.uint8, device=device)
        symm_mem.rendezvous(self.buffer, group_name)
        # one-shot sums peers in an order of its own on each rank: the same bits only with two ranks
        usable = size == 2 and hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out")
        self.one_shot_max_bytes = one_shot_max_bytes if usable else 0

    def fits(self, x: torch.Tensor) -> bool:
        nbytes = x.numel() * x.element_size()
        return (x.dtype in SYMMETRIC_DTYPES and x.is_contiguous() and nbytes <= self.max_bytes
                and nbytes % 16 == 0 and x.data_ptr() % 16 == 0)  # the kernels load 16 bytes at a time

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x summed over ranks: a new tensor (one-shot) or x itself (two-shot)."""
        nbytes = x.numel() * x.element_size()
        staged = self.buffer[:nbytes].view(x.dtype).view(x.shape)
        if nbytes <= self.one_shot_max_bytes:
            out = torch.empty_like(x)
            torch.ops.symm_mem.one_shot_all_reduce_copy_out(staged, x, "sum", self.group_name, out)
            return out
        staged.copy_(x)
        torch.ops.symm_mem.two_shot_all_reduce_out(staged, "sum", self.group_name, x)
        return x

    def describe(self) -> str:
        kinds = f"one-shot up to {self.one_shot_max_bytes / 2**20:g} MiB, two-shot" if self.one_shot_max_bytes \
            else "two-shot"
        return f"symmetric memory ({kinds}) up to {self.max_bytes / 2**20:.0f} MiB, NCCL above"


class TorchTPGroup(TPGroup):
    """The default torch.distributed group as a TPGroup (see layers/parallel.py for the shapes)."""

    def __init__(self, rank: int, size: int, backend: str, device: torch.device):
        self.rank, self.size, self.backend, self.device = rank, size, backend, device
        # all_gather_single is all_gather_into_tensor's name from torch 2.13 on
        self._gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        self._symmetric: Optional[SymmetricAllReduce] = None

    def enable_symmetric_all_reduce(self, max_bytes: int) -> str:
        """Map a buffer of max_bytes (capped) for the all-reduces, on every rank or none; collective.
        Returns what all_reduce uses from now on, for the log."""
        if self.device.type != "cuda" or self.size < 2:
            return self.backend
        if os.environ.get("TIDEMIND_TP_ALLREDUCE", "auto") == "nccl":
            return "NCCL (TIDEMIND_TP_ALLREDUCE=nccl)"
        candidate, reason = None, ""
        try:
            candidate = SymmetricAllReduce(dist.group.WORLD.group_name, self.size, self.device,
                                           min(max_bytes, SYMMETRIC_MAX_BYTES))
        except Exception as exc:  # no P2P between these GPUs, or a torch without symmetric memory
            reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if self.min_int(int(candidate is not None)) == 0:  # every rank or none
            return f"NCCL (symmetric memory unavailable{': ' + reason if reason else ' on another rank'})"
        self._symmetric = candidate
        return candidate.describe()

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self._symmetric is not None and self._symmetric.fits(x):
            return self._symmetric(x)
        dist.all_reduce(x)
        return x

    def all_reduce_max(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape
        out = x.new_empty((self.size * rows, cols))  # rank i's rows at [i * rows, (i + 1) * rows)
        self._gather_into(out, x.contiguous())
        return out.view(self.size, rows, cols).transpose(0, 1).reshape(rows, self.size * cols)

    def broadcast(self, x: torch.Tensor) -> torch.Tensor:
        dist.broadcast(x, src=0)
        return x

    def min_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


def init_tp_group(rank: int, size: int, address: str, device: torch.device, timeout_s: float) -> TorchTPGroup:
    """Join the group (blocks until every rank has joined, at most timeout_s). Collectives that wait
    longer than timeout_s for a peer fail instead of hanging."""
    for key, value in WORKER_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    backend = collective_backend(device.type)
    host, port = parse_address(address)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    logger.info("tensor-parallel rank %d of %d joined the %s group at %s", rank, size, backend, address)
    return TorchTPGroup(rank, size, backend, device)


def destroy_tp_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
