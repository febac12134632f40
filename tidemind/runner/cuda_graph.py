"""CUDA graphs of decode-only steps: one graph per batch size of a ladder up to max_batch_size.

A decode step of B sequences replays the graph of the smallest captured size >= B. Its inputs are
the runner's static step buffers (step_inputs.StepBuffers): prepare_step() pads rows B..size-1 on
the host (token 0 at position 0, cache slot -1 so nothing is written, seq_len 0 so nothing is read)
and uploads them with the step's own rows, so a replay only reads what that one copy sent. The
graphs share one memory pool, captured largest first so the pool is sized by the largest. A quantized
KV cache changes nothing here: its scales are device tensors beside its data, read and written by
the same captured kernels, and no launcher reads device data on the host.
"""
from __future__ import annotations

import bisect
import logging
import time
from typing import Dict, List, Tuple

import torch

from ..attention.base import AttentionBackend, StepLayout
from ..attention.kv_cache import LayerKVCache
from .step_inputs import StepBuffers

logger = logging.getLogger("tidemind")


def capture_sizes(max_batch_size: int) -> List[int]:
    """1, 2, 4, 8, then every multiple of 16, up to and including max_batch_size."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch_size]
    sizes += list(range(16, max_batch_size, 16))
    return sizes + [max_batch_size]


def graph_layout(buffers: StepBuffers, batch_size: int, block_size: int, max_model_len: int) -> StepLayout:
    """The layout of a decode step of ``batch_size`` sequences over the static buffers; its host
    values are bounds (the replays' real lengths live only in the buffers)."""
    return StepLayout(
        num_tokens=batch_size, num_seqs=batch_size, num_decodes=batch_size, max_query_len=1,
        max_seq_len=max_model_len, block_size=block_size,
        slot_mapping=buffers.device_view("slot_mapping", batch_size),
        seq_lens=buffers.device_view("seq_lens", batch_size),
        query_start_loc=buffers.device_view("query_start_loc", batch_size + 1),
        block_tables=buffers.block_tables_device(batch_size), seq_lens_host=None, query_start_loc_host=None)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, attention: AttentionBackend, kv_caches: List[LayerKVCache],
                 buffers: StepBuffers, block_size: int, max_model_len: int, device: torch.device):
        self.model = model
        self.attention = attention
        self.kv_caches = kv_caches
        self.buffers = buffers
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.device = device
        self._sizes: List[int] = []
        self._graphs: Dict[int, Tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def padded_size(self, num_seqs: int) -> int:
        """The captured size a decode step of num_seqs sequences replays (num_seqs if none fits)."""
        i = bisect.bisect_left(self._sizes, num_seqs)
        return self._sizes[i] if i < len(self._sizes) else num_seqs

    def can_run(self, num_seqs: int) -> bool:
        return bool(self._sizes) and num_seqs <= self._sizes[-1]

    def _pad_inputs(self, batch_size: int) -> None:
        """Make every row of the static buffers a harmless padding row (for capture)."""
        b = self.buffers
        b.wait_until_writable()
        b.host("input_ids", batch_size)[:] = 0
        b.host("positions", batch_size)[:] = 0
        b.host("slot_mapping", batch_size)[:] = -1
        b.host("seq_lens", batch_size)[:] = 0
        b.host("query_start_loc", batch_size + 1)[:] = range(batch_size + 1)
        b.upload(batch_size)
        torch.cuda.synchronize(self.device)

    def _run_model(self, batch_size: int, metadata) -> torch.Tensor:
        b = self.buffers
        return self.model(b.device_view("input_ids", batch_size), b.device_view("positions", batch_size),
                          self.kv_caches, metadata)

    @torch.inference_mode()
    def capture(self, max_batch_size: int) -> float:
        start = time.perf_counter()
        sizes = capture_sizes(max_batch_size)
        pool = torch.cuda.graph_pool_handle()
        self._pad_inputs(max_batch_size)
        warm_up = 0.0
        for batch_size in reversed(sizes):
            metadata = self.attention.build_graph_metadata(
                graph_layout(self.buffers, batch_size, self.block_size, self.max_model_len))
            started = time.perf_counter()
            self._run_model(batch_size, metadata)  # warm-up: compiles kernels, settles allocations
            torch.cuda.synchronize(self.device)
            warm_up += time.perf_counter() - started
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                hidden = self._run_model(batch_size, metadata)
            self._graphs[batch_size] = (graph, hidden)
        torch.cuda.synchronize(self.device)
        self._sizes = sizes
        seconds = time.perf_counter() - start
        logger.info("captured %d CUDA graphs of decode steps (batch sizes %d..%d) in %.1f s (warm-up runs, with "
                    "their kernel compiles, %.1f s)", len(sizes), sizes[0], sizes[-1], seconds, warm_up)
        return seconds

    def run(self, num_seqs: int) -> torch.Tensor:
        """Replay the graph for a decode step whose (padded) inputs are already in the buffers;
        returns the hidden states of its num_seqs real rows: [num_seqs, hidden]."""
        graph, hidden = self._graphs[self.padded_size(num_seqs)]
        graph.replay()
        return hidden[:num_seqs]
