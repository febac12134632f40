"""The tensor-parallel process group of a worker: torch.distributed, NCCL on GPUs, gloo on the CPU.

Every rank calls init_tp_group() with the same rendezvous address (host:port of a TCP store that
rank 0 opens; it comes from EngineConfig.dist_init_addr or the executor's choice, never a literal
here) and gets a TorchTPGroup, the layers/parallel.TPGroup whose collectives are torch.distributed's.
The group is the default (world) group: one engine per process, all of its ranks tensor-parallel.

NCCL collectives are enqueued on the current CUDA stream's order (no host sync), so decode steps
captured as CUDA graphs capture them too (the first collectives, which create NCCL's communicator,
run in the capture's warm-up). NVLink multicast (NVLS) stays off on shared machines:
NCCL_NVLS_ENABLE=0 unless the environment says otherwise.
"""
from __future__ import annotations

import datetime
import logging
import os
import socket
from typing import Tuple

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


class TorchTPGroup(TPGroup):
    """The default torch.distributed group as a TPGroup (see layers/parallel.py for the shapes)."""

    def __init__(self, rank: int, size: int, backend: str, device: torch.device):
        self.rank, self.size, self.backend, self.device = rank, size, backend, device
        # all_gather_single is all_gather_into_tensor's name from torch 2.13 on
        self._gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
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
