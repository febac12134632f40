"""A launched step's sampled token ids: on the device at once, on the host when collected.

ModelRunner.launch() leaves the ids of an all-greedy step on the device (argmax) and starts their
copy to a pinned host buffer; collect() waits for that copy alone, so the host can prepare the next
step meanwhile. The next step reads the ids on the device (step_inputs.py's pending tokens), which
is why a launched step keeps its device tensor until the following one replaces it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np
import torch

from ..messages import TokenLogprobs


@dataclass
class LaunchedStep:
    request_ids: List[int]  # the sampled requests, in logits order
    rows: np.ndarray  # [num_sampled] their InputBatch rows
    positions: np.ndarray  # [num_sampled] where each row's new token goes (InputBatch.append_placeholders)
    token_ids: Optional[torch.Tensor]  # int64 [num_sampled] on the device
    host_ids: Optional[List[int]]  # the same on the host, once there (at once where the sampler put them)
    logprobs: Dict[int, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: Dict[int, list] = field(default_factory=dict)
    # SampledIdsFetch's copy to the host: the pinned buffer and the event recorded after the copy
    fetch_buffer: Optional[torch.Tensor] = None
    fetch_done: Optional[torch.cuda.Event] = None
    resolved: bool = False  # its ids are in the InputBatch (ModelRunner._resolve)

    @classmethod
    def empty(cls) -> "LaunchedStep":
        """A step that sampled nothing (prompt chunks that do not reach their end)."""
        return cls([], np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), None, [], resolved=True)


class SampledIdsFetch:
    """Copies launched steps' sampled ids to the host without blocking the host until they are
    needed. Pinned buffers in a ring: at most two launched steps wait to be collected, so a buffer
    is read before the ring comes back to it."""

    RING = 3

    def __init__(self, device: torch.device, capacity: int = 1024):
        self.device = device
        self._ring: List[Optional[torch.Tensor]] = [None] * self.RING
        self._next = 0
        self._capacity = capacity

    def start(self, launched: LaunchedStep) -> None:
        if self.device.type != "cuda":
            return  # the CPU: the ids are where they were computed
        n = launched.token_ids.numel()
        buffer = self._ring[self._next]
        if buffer is None or buffer.numel() < n:
            buffer = self._ring[self._next] = torch.empty(max(n, self._capacity), dtype=torch.int64, pin_memory=True)
        self._next = (self._next + 1) % self.RING
        buffer[:n].copy_(launched.token_ids, non_blocking=True)
        launched.fetch_buffer, launched.fetch_done = buffer, torch.cuda.Event()
        launched.fetch_done.record()

    def finish(self, launched: LaunchedStep) -> List[int]:
        if launched.fetch_done is None:
            return launched.token_ids.tolist()
        launched.fetch_done.synchronize()
        return launched.fetch_buffer[:len(launched.request_ids)].tolist()
