"""Everything of a step that touches tensors: the model on its device, the KV cache, the runner's
persistent batch, the step's inputs, CUDA graphs and sampling.

Under tensor parallelism one ModelRunner runs per rank (runner/worker.py), each with its slice of
the model and the KV cache of its kv heads, fed the same step contract. Every rank computes the
step's logits (the LM head all-gathers them), and they are the same bits on every rank: every
all-reduce the model makes leaves identical sums on all ranks (NCCL's, and the two-shot one of
runner/distributed.py, reduce each element once and copy the result). So an all-greedy step takes
each rank's own argmax on its device, with no host wait and no broadcast. Any other sampling runs on
rank 0 alone, which broadcasts the ids for every rank to append to its batch: grammars and the
sampler's host work run once, and no two samplers have to draw the same random numbers. Only rank
0's RunnerOutput is used.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections import deque
from typing import Deque, List, Optional

import numpy as np
import torch

from ..attention import create_attention_backend, resolve_attention_backend
from ..attention.kv_cache import LayerKVCache
from ..config import EngineConfig
from ..core.outputs import RunnerOutput, SchedulerOutput
from ..kernels.registry import kernel_set
from ..layers.context import BuildContext
from ..layers.quantization.gguf import GGUFConfig
from ..layers.parallel import SINGLE_RANK, TPGroup, kv_heads_of_rank
from ..loader import load_model, read_quantization
from ..loader.checkpoint import model_head_dim
from .cuda_graph import DecodeGraphs
from .dense_backend import apply_dense_backend, resolve_dense_backend
from .device import to_device
from .input_batch import InputBatch
from .kv_cache import KVCacheSpec, allocate_kv_cache, kv_bytes_per_token, plan_kv_cache
from .prompt_logprobs import PromptLogprobs
from .sampler import Sampler
from .sampled_ids import LaunchedStep as _LaunchedStep, SampledIdsFetch
from .step_inputs import PreparedStep, StepBuffers, prepare_step
from .structured_output import GrammarCompiler
from .swap import HostKVPool

logger = logging.getLogger("tidemind")


class ModelRunner:
    """Holds the model, its KV cache and the batch of requests on one device; executes steps.

    Start-up order: __init__ (load weights), init_kv_cache (size and allocate the cache, the
    batch and the step buffers), capture_graphs (GPU, unless eager), then execute() every step.
    """

    def __init__(self, model_path: str, device: torch.device, dtype: torch.dtype, attention_backend: str = "auto",
                 model_format: Optional[str] = None, tp_group: TPGroup = SINGLE_RANK):
        self.model_path = model_path  # GrammarCompiler reads the tokenizer from it (structured output)
        self.device = device
        self.dtype = dtype
        self.tp = tp_group
        quantization = read_quantization(model_path, model_format)
        # GGUF weights at stored precision run on the C kernels: attention and layer ops join them
        backend_name = resolve_attention_backend(attention_backend, device, model_head_dim(model_path),
                                                 cpu_kernels=isinstance(quantization, GGUFConfig))
        # The layer kernels follow the attention backend: Triton for both, C for both, or the torch
        # reference; the quantization method is the one the checkpoint's config.json records.
        self.build_context = BuildContext(kernels=kernel_set(backend_name),
                                          attention_backend=create_attention_backend(backend_name),
                                          quantization=quantization, tp_group=tp_group)
        logger.info("attention backend: %s; layer kernels: %s", backend_name, self.build_context.kernels.name)
        self.model, self.model_config = load_model(model_path, dtype, device, self.build_context)
        self.dense_backend = resolve_dense_backend("auto", device, dtype)
        apply_dense_backend(self.model, self.dense_backend)
        logger.info("dense matmul backend: %s", self.dense_backend)
        self.attention = self.build_context.attention_backend
        self.sampler = Sampler()
        self.prompt_logprobs = PromptLogprobs()
        self.kv_spec: Optional[KVCacheSpec] = None
        self.kv_caches: List[LayerKVCache] = []
        self.host_kv: Optional[HostKVPool] = None  # the KV swap pool, if any
        self.batch: Optional[InputBatch] = None
        self.buffers: Optional[StepBuffers] = None
        self.graphs: Optional[DecodeGraphs] = None
        self._prepared: Optional[PreparedStep] = None  # by prepare(), for launch()
        self._launched: Deque[_LaunchedStep] = deque()  # by launch(), for collect(), oldest first
        self._last_sampled: Optional[_LaunchedStep] = None  # the newest launched step that sampled
        self._fetch = SampledIdsFetch(device)

    def init_kv_cache(self, engine_config: EngineConfig, session_len: int, max_batch_size: int) -> KVCacheSpec:
        """Size and allocate the KV cache (after the weights, from the memory left), then the batch
        state and step buffers for sequences of at most min(session_len, cache tokens) tokens."""
        max_tokens = max(engine_config.max_prefill_token_num, max_batch_size)
        if self.tp.size > 1:  # before sizing the cache: the all-reduce buffer takes device memory too
            activation_bytes = max_tokens * self.model_config.hidden_size * self.dtype.itemsize
            logger.info("tensor-parallel all-reduce: %s", self.tp.enable_symmetric_all_reduce(activation_bytes))
        cache_config = self.rank_cache_config()
        spec = plan_kv_cache(cache_config, engine_config, self.dtype, self.device, session_len, max_batch_size)
        if self.tp.size > 1:  # every rank must hold the same blocks: the smallest cache any rank can afford
            spec = dataclasses.replace(spec, num_blocks=self.tp.min_int(spec.num_blocks),
                                       budget_source=f"{spec.budget_source}; the least of {self.tp.size} ranks")
        self.kv_spec = spec
        start = time.perf_counter()
        self.kv_caches = allocate_kv_cache(spec, cache_config, self.dtype, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the zero fill too: what the allocation really costs
        allocated = time.perf_counter()
        self._log_kv_dtype(spec, cache_config)
        self.host_kv = HostKVPool.create(spec.num_host_blocks, self.kv_caches)
        max_model_len = min(session_len, spec.num_tokens)
        max_blocks = -(-max_model_len // spec.block_size)
        samples = self.tp.rank == 0  # other ranks never sample: they keep no grammar state
        self.batch = InputBatch(max_batch_size, max_model_len, max_blocks,
                                GrammarCompiler(self.model_path, self.model_config.vocab_size) if samples else None,
                                samples=samples)
        self.buffers = StepBuffers(max_tokens, max_batch_size, max_blocks, self.device)
        for rotary in self.model.rotary_embeddings():
            rotary.reserve(max_model_len)
        logger.info("KV cache: %.2f s to allocate and zero %.1f GiB, %.2f s for the batch state and step buffers",
                    allocated - start, spec.num_bytes / 2**30, time.perf_counter() - allocated)
        return spec

    def rank_cache_config(self):
        """The model config as this rank's KV cache sees it: its kv heads only (all of them at tp 1)."""
        config = self.model_config
        if self.tp.size == 1:
            return config
        _, num_kv_heads = kv_heads_of_rank(config.num_attention_heads, config.num_kv_heads, self.tp.rank,
                                           self.tp.size)
        return dataclasses.replace(config, num_kv_heads=num_kv_heads)

    def _log_kv_dtype(self, spec: KVCacheSpec, cache_config) -> None:
        per_token = kv_bytes_per_token(cache_config, self.dtype, spec.quant_policy)
        if not spec.quant_policy:
            logger.info("KV cache dtype %s: %d bytes a token, %d tokens", spec.kv_dtype, per_token, spec.num_tokens)
            return
        unquantized = kv_bytes_per_token(cache_config, self.dtype, 0)
        logger.info("KV cache dtype %s (quant_policy %d: per token and head, asymmetric, float16 scale and zero): "
                    "%d bytes a token, %.3fx the tokens of %s in the same memory; %d tokens", spec.kv_dtype,
                    spec.quant_policy, per_token, unquantized / per_token, str(self.dtype).replace("torch.", ""),
                    spec.num_tokens)

    def capture_graphs(self, max_batch_size: int) -> Optional[float]:
        """Capture decode steps as CUDA graphs (GPU and a graph-capable attention backend only).
        Returns the seconds it took, or None where graphs do not apply."""
        if self.device.type != "cuda" or not self.attention.supports_cuda_graphs:
            return None
        self.graphs = DecodeGraphs(self.model, self.attention, self.kv_caches, self.buffers,
                                   self.kv_spec.block_size, self.batch.max_model_len, self.device)
        return self.graphs.capture(max_batch_size)

    def execute(self, scheduled: SchedulerOutput) -> RunnerOutput:
        """Run one step to its sampled tokens: prepare, launch and collect in a row."""
        self.prepare(scheduled)
        self.launch()
        return self.collect()

    @torch.inference_mode()
    def prepare(self, scheduled: SchedulerOutput) -> None:
        """Apply the step's deltas to the batch, make its block copies and send its inputs to the
        device. May run while the previous step still runs there (its sampled tokens are then
        placeholders that launch() fills on the device, step_inputs.py)."""
        batch = self.batch
        # Departures first: a row freed now may be taken by a new request of this step.
        for request_id in scheduled.finished_request_ids:
            if request_id in batch:
                self.prompt_logprobs.forget(batch.row(request_id))
            batch.remove(request_id)
        for new in scheduled.new_requests:
            self.prompt_logprobs.watch(batch.add(new), new)
        for cached in scheduled.cached_requests:
            batch.update(cached)
        if scheduled.swap_out or scheduled.swap_in:
            self.host_kv.apply(scheduled.swap_out, scheduled.swap_in)
        self._prepared = None
        if scheduled.num_scheduled_tokens:
            padding = self.graphs.padded_size if self.graphs is not None else None
            last = self._last_sampled
            self._prepared = prepare_step(batch, scheduled, self.buffers, self.kv_spec.block_size, padding,
                                          last.rows if last is not None else None)

    @torch.inference_mode()
    def launch(self) -> None:
        """Run the prepared step on the device up to its sampled ids, without waiting for them. Up
        to two launched steps may wait to be collected: an all-greedy step (argmax on the device)
        is queued behind the previous one at once; any other sampling reads the earlier steps'
        tokens on the host, so they are resolved first (the sampler waits for the device then)."""
        step, self._prepared = self._prepared, None
        if step is None:
            return
        if len(self._launched) > 1:
            raise RuntimeError("launch() with two steps not collected")
        batch = self.batch
        if step.num_pending:  # the previous step's sampled ids, where this one reads them
            ids = step.input_ids
            ids.index_copy_(0, step.pending_dst.long(),
                            self._last_sampled.token_ids.index_select(0, step.pending_src.long()).to(ids.dtype))
        hidden = self._forward(step)  # [num_tokens, hidden]
        self.prompt_logprobs.collect(self.model, hidden, batch, step)
        batch.num_computed_tokens[step.scheduled_rows] += step.num_scheduled
        if not step.sampled_request_ids:
            self._launched.append(_LaunchedStep.empty())
            return
        if len(step.sampled_request_ids) < step.num_tokens:
            hidden = hidden.index_select(0, step.logits_indices)
        logits = self.model.compute_logits(hidden)  # [num_sampled, vocab] float32, the same on every rank
        rows = step.sampled_rows
        if batch.plain_greedy[rows].all():  # argmax alone decides: stays on the device (every rank's own)
            token_ids, host_ids, logprobs = self.build_context.kernels.greedy_ids(logits), None, []
        else:  # the sampler reads earlier tokens on the host; its ids go back for the next step's inputs
            for launched in self._launched:
                self._resolve(launched)
            host_ids, logprobs = self._sample(logits, step) if self.tp.rank == 0 else (None, [])
            if self.tp.size > 1:
                host_ids = self._share_sampled(host_ids, len(rows))
            token_ids = to_device(host_ids, torch.int64, self.device)
        rids = step.sampled_request_ids
        launched = _LaunchedStep(
            request_ids=rids, rows=rows, positions=batch.append_placeholders(rows), token_ids=token_ids,
            host_ids=host_ids, logprobs={rid: lp for rid, lp in zip(rids, logprobs) if lp is not None},
            prompt_logprobs=self.prompt_logprobs.take(rids, rows))
        if host_ids is None:
            self._fetch.start(launched)
        self._launched.append(launched)
        self._last_sampled = launched

    def collect(self) -> RunnerOutput:
        """The oldest launched step's output: its sampled tokens (waiting for the device if need
        be), written into the rows that still hold their requests."""
        if not self._launched:
            return RunnerOutput(sampled_token_ids={})
        launched = self._launched.popleft()
        self._resolve(launched)
        return RunnerOutput(sampled_token_ids=dict(zip(launched.request_ids, launched.host_ids)),
                            logprobs=launched.logprobs, prompt_logprobs=launched.prompt_logprobs)

    def oldest_step_ready(self) -> bool:
        """Whether collect() would return without waiting for the device."""
        if not self._launched:
            return True
        oldest = self._launched[0]
        return oldest.resolved or oldest.host_ids is not None or oldest.fetch_done is None or oldest.fetch_done.query()

    def _resolve(self, launched: _LaunchedStep) -> None:
        """Bring a launched step's ids to the host and into the batch (once)."""
        if launched.resolved:
            return
        if launched.host_ids is None:
            launched.host_ids = self._fetch.finish(launched)
        launched.resolved = True
        batch, token_ids = self.batch, launched.host_ids
        keep = [i for i, (rid, row) in enumerate(zip(launched.request_ids, launched.rows.tolist()))
                if batch.holds(rid, row)]
        if len(keep) == len(token_ids):
            batch.fill_placeholders(launched.rows, launched.positions, np.asarray(token_ids, dtype=np.int32))
        elif keep:
            batch.fill_placeholders(launched.rows[keep], launched.positions[keep],
                                    np.asarray(token_ids, dtype=np.int32)[keep])

    def _forward(self, step: PreparedStep) -> torch.Tensor:
        if self.graphs is not None and step.is_decode_only and self.graphs.can_run(step.num_seqs):
            return self.graphs.run(step.num_seqs)
        metadata = self.attention.build_metadata(step.layout)
        return self.model(step.input_ids, step.positions, self.kv_caches, metadata)

    def _sample(self, logits: torch.Tensor, step: PreparedStep):
        """(token ids, logprobs or None per row) for the sampled rows, in logits order."""
        batch = self.batch
        out = self.sampler(logits, [batch.sampling_inputs(int(row)) for row in step.sampled_rows])
        return out.token_ids, out.logprobs

    def _share_sampled(self, token_ids: Optional[List[int]], count: int) -> List[int]:
        """Rank 0's sampled ids (`token_ids` there, None elsewhere) on every rank: one broadcast."""
        ids = torch.empty(count, dtype=torch.int64, device=self.device)
        if self.tp.rank == 0:
            ids.copy_(torch.tensor(token_ids, dtype=torch.int64))
        self.tp.broadcast(ids)
        return token_ids if self.tp.rank == 0 else ids.tolist()

    def close(self) -> None:
        self.graphs = None
        self.kv_caches = []
        self.host_kv = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
