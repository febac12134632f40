"""Everything of a step that touches tensors: inputs, the forward pass, the KV cache, sampling."""
from __future__ import annotations

import logging
from typing import List

import torch

from ..config import EngineConfig, ModelConfig
from ..core.outputs import RunnerOutput, ScheduledSequence, SchedulerOutput
from ..layers.attention import build_attention_metadata
from ..loader import load_model
from .dense_backend import apply_dense_backend, resolve_dense_backend
from .kv_cache import KVCacheSpec, allocate_kv_cache, plan_kv_cache
from .sampler import Sampler

logger = logging.getLogger("tidemind")


class ModelRunner:
    """Holds the model and its KV cache on one device and executes scheduled steps."""

    def __init__(self, model_path: str, device: torch.device, dtype: torch.dtype):
        self.device = device
        self.dtype = dtype
        self.model, self.model_config = load_model(model_path, dtype, device)
        self.dense_backend = resolve_dense_backend("auto", device, dtype)
        apply_dense_backend(self.model, self.dense_backend)
        logger.info("dense matmul backend: %s", self.dense_backend)
        self.sampler = Sampler()
        self.kv_spec: KVCacheSpec | None = None
        self.kv_caches: List[torch.Tensor] = []

    @property
    def config(self) -> ModelConfig:
        return self.model_config

    def init_kv_cache(self, engine_config: EngineConfig, session_len: int, max_batch_size: int) -> KVCacheSpec:
        self.kv_spec = plan_kv_cache(self.model_config, engine_config, self.dtype, self.device,
                                     session_len, max_batch_size)
        self.kv_caches = allocate_kv_cache(self.kv_spec, self.model_config, self.dtype, self.device)
        return self.kv_spec

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        # Single-token (decode) sequences first: attention batches them together.
        seqs = sorted(scheduled.sequences, key=lambda s: s.num_tokens != 1)
        input_ids, positions = self._flatten(seqs)
        meta = build_attention_metadata(
            query_lens=[s.num_tokens for s in seqs],
            seq_lens=[s.start_pos + s.num_tokens for s in seqs],
            block_tables=[s.block_table for s in seqs],
            block_size=self.kv_spec.block_size, device=self.device)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)  # [num_tokens, hidden]

        sampled = [(i, s) for i, s in enumerate(seqs) if s.sample]
        if not sampled:
            return RunnerOutput(sampled_token_ids={})
        last_rows = [meta.query_start_loc_host[i + 1] - 1 for i, _ in sampled]
        rows = torch.tensor(last_rows, dtype=torch.int64, device=self.device)
        logits = self.model.compute_logits(hidden.index_select(0, rows))  # [num_sampled, vocab] float32
        out = self.sampler(logits, [s.sampling for _, s in sampled])
        token_ids = {s.request_id: tok for (_, s), tok in zip(sampled, out.token_ids)}
        logprobs = {s.request_id: lp for (_, s), lp in zip(sampled, out.logprobs) if lp is not None}
        return RunnerOutput(sampled_token_ids=token_ids, logprobs=logprobs)

    def _flatten(self, seqs: List[ScheduledSequence]):
        ids: List[int] = []
        pos: List[int] = []
        for s in seqs:
            ids.extend(s.token_ids)
            pos.extend(range(s.start_pos, s.start_pos + s.num_tokens))
        as_tensor = lambda v: torch.tensor(v, dtype=torch.int64).to(self.device, non_blocking=True)  # noqa: E731
        return as_tensor(ids), as_tensor(pos)

    def close(self) -> None:
        self.kv_caches = []
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
