"""The engine: one step = schedule -> execute -> update -> detokenize.

Called from a single thread (see async_engine.py for the thread that drives it). Validation of a
new request is read-only and may run in the caller's thread.
"""
from __future__ import annotations

import json
import logging
import os
import random
from typing import Dict, List, Optional, Sequence

from ..chat.detokenizer import IncrementalDetokenizer
from ..chat.tokenizer import Tokenizer
from ..config import EngineConfig, GenerationConfig
from ..loader import resolve_model
from ..messages import RequestOutput
from .block_manager import BlockManager
from .request import Request
from .scheduler import Scheduler

logger = logging.getLogger("tidemind")


def _checkpoint_dtype(model_dir: str) -> Optional[str]:
    with open(os.path.join(model_dir, "config.json")) as f:
        hf_config = json.load(f)
    dtype = hf_config.get("torch_dtype") or hf_config.get("dtype")
    return dtype if isinstance(dtype, str) else None


class Engine:
    def __init__(self, model: Optional[str] = None, config: Optional[EngineConfig] = None):
        # torch-touching parts are imported here so that the bookkeeping modules stay torch-free.
        import torch

        from ..runner.device import resolve_device, resolve_dtype
        from ..runner.model_runner import ModelRunner

        self.config = config or EngineConfig()
        self.resolved = resolve_model(model)
        device = resolve_device(self.config.device)
        if device.type == "cpu" and self.config.num_threads:
            torch.set_num_threads(self.config.num_threads)
        dtype = resolve_dtype(self.config.dtype, _checkpoint_dtype(self.resolved.path), device)
        logger.info("loading %s from %s on %s in %s", self.resolved.name, self.resolved.path, device,
                    str(dtype).replace("torch.", ""))
        self.runner = ModelRunner(self.resolved.path, device, dtype)
        self.model_config = self.runner.model_config
        self.tokenizer = Tokenizer.from_pretrained(self.resolved.path)
        self.session_len = self.config.session_len or self.model_config.max_position_embeddings
        if self.session_len > self.model_config.max_position_embeddings:
            logger.warning("session_len=%d is longer than the model was trained for (%d positions)",
                           self.session_len, self.model_config.max_position_embeddings)
        self.max_batch_size = self.config.max_batch_size or (256 if device.type == "cuda" else 64)
        spec = self.runner.init_kv_cache(self.config, self.session_len, self.max_batch_size)
        logger.info("KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%s)", spec.num_blocks,
                    spec.block_size, spec.num_tokens, spec.num_bytes / 2**30, spec.budget_source)
        # A lone sequence must always fit in the cache, or preemption could never make room for it.
        self.max_total_tokens = min(self.session_len, spec.num_tokens)
        if self.max_total_tokens < self.session_len:
            logger.warning("the KV cache holds %d tokens, fewer than session_len=%d: sequences end at %d "
                           "tokens (raise --cache-max-entry-count or --num-gpu-blocks)",
                           spec.num_tokens, self.session_len, self.max_total_tokens)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.block_manager = BlockManager(spec.num_blocks, spec.block_size)
        self.scheduler = Scheduler(self.block_manager, self.max_batch_size, self.config.max_prefill_token_num)
        self._detokenizers: Dict[int, IncrementalDetokenizer] = {}
        self._pending: List[RequestOutput] = []  # outputs of aborts, emitted by the next step()

    # ----------------------------------------------------------------- requests
    def validate_request(self, prompt_token_ids: Sequence[int], gen_config: GenerationConfig) -> None:
        """Raise ValueError naming the fix when the request cannot run; changes nothing."""
        if not isinstance(gen_config, GenerationConfig):
            raise ValueError(f"gen_config must be a GenerationConfig, got {type(gen_config).__name__}")
        if len(prompt_token_ids) == 0:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"the prompt holds token ids outside the vocabulary [0, {vocab})")
        if len(prompt_token_ids) >= self.max_total_tokens:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens but a session holds at most "
                f"{self.max_total_tokens} (session_len={self.session_len}), leaving no room for an answer: "
                f"shorten the prompt or raise --session-len")

    def add_request(self, request_id: int, prompt_token_ids: Sequence[int], gen_config: GenerationConfig,
                    seed: Optional[int] = None) -> None:
        self.validate_request(prompt_token_ids, gen_config)
        if seed is None:
            seed = gen_config.random_seed if gen_config.random_seed is not None else random.getrandbits(31)
        bad_words = self.tokenizer.encode_bad_words(gen_config.bad_words) if gen_config.bad_words else ()
        request = Request(request_id, list(prompt_token_ids), gen_config, seed=seed,
                          eos_token_ids=self.eos_token_ids, max_total_tokens=self.max_total_tokens,
                          bad_word_token_ids=bad_words)
        if gen_config.max_new_tokens == 0:
            self._pending.append(self._final_output(request, "length"))
            return
        self._detokenizers[request_id] = IncrementalDetokenizer(
            self.tokenizer, skip_special_tokens=gen_config.skip_special_tokens,
            stop_words=gen_config.stop_words or (),
            include_stop_str_in_output=gen_config.include_stop_str_in_output)
        self.scheduler.add_request(request)

    def abort_request(self, request_id: int, reason: str = "abort", error: Optional[str] = None) -> None:
        request = self.scheduler.get_request(request_id)
        if request is None or not self.scheduler.finish_request(request_id, reason):
            return
        self._detokenizers.pop(request_id, None)
        self._pending.append(self._final_output(request, reason, error))

    def abort_all(self, error: str) -> None:
        """End every unfinished request with finish_reason "error" (after a failed step)."""
        for request_id in list(self._detokenizers):
            self.abort_request(request_id, "error", error)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._pending)

    # ----------------------------------------------------------------- the step
    def step(self) -> List[RequestOutput]:
        outputs, self._pending = self._pending, []
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            return outputs
        runner_output = self.runner.execute(scheduled)
        for request in self.scheduler.update(scheduled, runner_output):
            outputs.append(self._token_output(request, runner_output.logprobs.get(request.request_id)))
        return outputs

    def _token_output(self, request: Request, logprobs) -> RequestOutput:
        """Detokenize the request's newest token; a stop word found in the text ends the request."""
        token = request.output_token_ids[-1]
        detok = self._detokenizers[request.request_id]
        ends_on_token = request.is_finished and request.finish_reason == "stop" and token in request.sampling.stop_token_ids
        # A stop token's text shows only with include_stop_str_in_output (special tokens never do).
        text = "" if ends_on_token and not request.gen_config.include_stop_str_in_output else detok.add(token)
        if detok.stopped and not request.is_finished:
            self.scheduler.finish_request(request.request_id, "stop")
        if request.is_finished:
            if not detok.stopped:
                text += detok.finish()
            del self._detokenizers[request.request_id]
        return RequestOutput(
            request_id=request.request_id, new_token_ids=[token], new_text=text,
            num_prompt_tokens=len(request.prompt_token_ids), num_generated_tokens=len(request.output_token_ids),
            new_logprobs=[logprobs] if logprobs is not None else None, finished=request.is_finished,
            finish_reason=request.finish_reason)

    def _final_output(self, request: Request, reason: str, error: Optional[str] = None) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id, new_token_ids=[], new_text="",
            num_prompt_tokens=len(request.prompt_token_ids), num_generated_tokens=len(request.output_token_ids),
            finished=True, finish_reason=reason, error=error)

    def close(self) -> None:
        self.runner.close()
