"""The engine: one step = schedule -> execute -> update -> detokenize.

Overlapped (EngineConfig.overlap_schedule, on by default with a GPU), a step does the same
work in another order, so that the device never waits for the host's bookkeeping:

    schedule N+1 -> prepare N+1 (inputs sent) -> launch N+1 (queued behind N) -> collect N (wait
    for its tokens) -> update + detokenize N (while the device runs N+1)

Step N+1 is scheduled before N's tokens are known: the scheduler counts them as in flight
(scheduler.py), the runner reads them on the device (runner/step_inputs.py); a step whose sampling
needs earlier tokens on the host (penalties, grammars, random draws) waits for them in launch
(model_runner.py). Outputs come one call of step() later than in the plain order; greedy tokens
are the same.

Called from a single thread (see async_engine.py for the thread that drives it). Validation of a
new request is read-only and may run in the caller's thread.

Failures stay contained: an exception while turning one request's token into its output fails
that request alone; an exception while executing a step fails the requests of that step (their
blocks are freed, the runner forgets them) and the engine goes on with the others, unless the
executor itself is dead (ExecutorDeadError: a tensor-parallel rank died, hung or failed), which
propagates: nothing can run any more. Each failure is
logged with the request ids; callers get finish_reason "error" with a message that names no
internal detail.
"""
from __future__ import annotations

import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

from ..chat.detokenizer import IncrementalDetokenizer, add_tokens
from ..chat.tokenizer import Tokenizer
from ..config import EngineConfig, GenerationConfig
from ..loader import resolve_model
from ..messages import RequestOutput
from ..core.block_manager import BlockManager
from ..core.request import Request
from ..core.outputs import RunnerOutput, SchedulerOutput
from ..core.scheduler import Scheduler
from .executor import ExecutorDeadError, create_executor, keep_gguf_quantized
from .faults import FAULTS

logger = logging.getLogger("tidemind")

# What callers see of a failure (the exception itself goes to the log, with the request ids).
STEP_FAILED = "the engine failed while running this request; the server log has the details"
OUTPUT_FAILED = "the engine failed while making this request's output; the server log has the details"


def load_tokenizer(path: str, note: str) -> Tokenizer:
    """The model's tokenizer, its load time logged with `note` (where it loads, and why)."""
    start = time.perf_counter()
    tokenizer = Tokenizer.from_pretrained(path)
    logger.info("tokenizer loaded in %.1f s (%s)", time.perf_counter() - start, note)
    return tokenizer


def check_request(prompt_token_ids: Sequence[int], gen_config: GenerationConfig, vocab_size: int,
                  max_total_tokens: int, session_len: int, session_id: Optional[int] = None, history: int = 0) -> None:
    """Raise ValueError naming the fix when a request cannot run in an engine of these limits.
    history: tokens the session holds already (its turn's prompt follows them)."""
    if not isinstance(gen_config, GenerationConfig):
        raise ValueError(f"gen_config must be a GenerationConfig, got {type(gen_config).__name__}")
    if len(prompt_token_ids) == 0:
        raise ValueError("the prompt is empty: give at least one token")
    if any(not 0 <= t < vocab_size for t in prompt_token_ids):
        raise ValueError(f"the prompt holds token ids outside the vocabulary [0, {vocab_size})")
    if history and history + len(prompt_token_ids) >= max_total_tokens:
        raise ValueError(
            f"session {session_id} holds {history} tokens; with this turn's {len(prompt_token_ids)} it "
            f"would leave no room for an answer within {max_total_tokens} tokens "
            f"(session_len={session_len}): end the session and start a new one, or raise --session-len")
    if len(prompt_token_ids) >= max_total_tokens:
        raise ValueError(
            f"the prompt has {len(prompt_token_ids)} tokens but a session holds at most "
            f"{max_total_tokens} (session_len={session_len}), leaving no room for an answer: "
            f"shorten the prompt or raise --session-len")


class Engine:
    def __init__(self, model: Optional[str] = None, config: Optional[EngineConfig] = None):
        self.config = config or EngineConfig()
        self.resolved = resolve_model(model, keep_quantized=keep_gguf_quantized(model, self.config))
        logger.info("model %s: %s", self.resolved.name, self.resolved.path)
        # The tokenizer (its first import of transformers takes seconds on a fresh machine) loads in
        # a thread while the weights go to the device, which mostly waits on I/O and copies.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="tidemind-tokenizer") as pool:
            tokenizer = pool.submit(load_tokenizer, self.resolved.path, "beside the weights")
            self.executor = create_executor(self.resolved.path, self.config)
            self.tokenizer = tokenizer.result()
        self.model_config = self.executor.model_config
        self.session_len = self.config.session_len or self.model_config.max_position_embeddings
        if self.session_len > self.model_config.max_position_embeddings:
            logger.warning("session_len=%d is longer than the model was trained for (%d positions)",
                           self.session_len, self.model_config.max_position_embeddings)
        self.max_batch_size = self.config.max_batch_size or (256 if self.executor.device_type == "cuda" else 64)
        start = time.perf_counter()
        self.kv_spec = spec = self.executor.init_kv_cache(self.config, self.session_len, self.max_batch_size)
        logger.info("KV cache: %d blocks x %d tokens = %d tokens, %.2f GiB (%s), allocated in %.1f s", spec.num_blocks,
                    spec.block_size, spec.num_tokens, spec.num_bytes / 2**30, spec.budget_source,
                    time.perf_counter() - start)
        if not self.config.eager_mode:
            self.executor.capture_graphs(self.max_batch_size)
        # A lone sequence must always fit in the cache, or preemption could never make room for it.
        self.max_total_tokens = min(self.session_len, spec.num_tokens)
        if self.max_total_tokens < self.session_len:
            logger.warning("the KV cache holds %d tokens, fewer than session_len=%d: sequences end at %d "
                           "tokens (raise --cache-max-entry-count or --num-gpu-blocks)",
                           spec.num_tokens, self.session_len, self.max_total_tokens)
        self.eos_token_ids = frozenset(self.model_config.eos_token_ids) | frozenset(self.tokenizer.eos_token_ids)
        self.block_manager = BlockManager(spec.num_blocks, spec.block_size,
                                          enable_prefix_caching=self.config.enable_prefix_caching)
        self.scheduler = Scheduler(self.block_manager, self.max_batch_size, self.config.max_prefill_token_num,
                                   num_host_blocks=spec.num_host_blocks)
        logger.info("prefix caching %s; KV swap to host %s", "on" if self.config.enable_prefix_caching else "off",
                    f"on ({spec.num_host_blocks} blocks)" if spec.num_host_blocks else "off")
        self._detokenizers: Dict[int, IncrementalDetokenizer] = {}
        self._pending: List[RequestOutput] = []  # outputs of aborts, emitted by the next step()
        self.overlap = self._resolve_overlap()
        self._in_flight: Optional[SchedulerOutput] = None  # overlapped: the step launched, not yet applied
        # Counters for metrics: prompt tokens of requests that got a first token, how many of
        # those came from a session's cache, and generated tokens.
        self.prompt_tokens_total = 0
        self.cached_prompt_tokens_total = 0
        self.generated_tokens_total = 0

    # ----------------------------------------------------------------- requests
    def validate_request(self, prompt_token_ids: Sequence[int], gen_config: GenerationConfig,
                         session_id: Optional[int] = None) -> None:
        """Raise ValueError naming the fix when the request cannot run; changes nothing.

        With a session, the request's prompt is the conversation so far plus `prompt_token_ids`."""
        history = self.session_tokens(session_id) if session_id is not None else 0
        check_request(prompt_token_ids, gen_config, self.model_config.vocab_size, self.max_total_tokens,
                      self.session_len, session_id, history)

    def session_tokens(self, session_id: int) -> int:
        """How many tokens the conversation holds (0 for a new session)."""
        return len(self.scheduler.sessions.history(session_id))

    def add_request(self, request_id: int, prompt_token_ids: Sequence[int], gen_config: GenerationConfig,
                    seed: Optional[int] = None, session_id: Optional[int] = None) -> None:
        """Queue a request. With `session_id` it is the next turn of that conversation: its prompt
        is the conversation's tokens plus `prompt_token_ids`, and it reuses the conversation's KV."""
        self.validate_request(prompt_token_ids, gen_config, session_id)
        if session_id is not None:
            prompt_token_ids = list(self.scheduler.sessions.history(session_id)) + list(prompt_token_ids)
        if seed is None:
            seed = gen_config.random_seed if gen_config.random_seed is not None else random.getrandbits(31)
        bad_words = self.tokenizer.encode_bad_words(gen_config.bad_words) if gen_config.bad_words else ()
        request = Request(request_id, list(prompt_token_ids), gen_config, seed=seed,
                          eos_token_ids=self.eos_token_ids, max_total_tokens=self.max_total_tokens,
                          bad_word_token_ids=bad_words, session_id=session_id)
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

    def end_session(self, session_id: int) -> None:
        """Forget a conversation and free its KV; a turn still running is aborted."""
        request = self.scheduler.end_session(session_id)
        if request is not None and self._detokenizers.pop(request.request_id, None) is not None:
            self._pending.append(self._final_output(request, "abort"))

    def stats(self) -> Dict[str, float]:
        """A snapshot for metrics (read from any thread; values may be one step apart)."""
        bm, scheduler = self.block_manager, self.scheduler
        swap = scheduler.swap
        return {"num_running": scheduler.num_running, "num_waiting": scheduler.num_waiting,
                "kv_blocks_total": bm.num_total_blocks, "kv_blocks_free": bm.num_free_blocks,
                "kv_usage": bm.usage, "kv_blocks_in_idle_sessions": scheduler.sessions.num_cached_blocks,
                "num_sessions": len(scheduler.sessions), "num_preemptions": scheduler.num_preemptions,
                "prompt_tokens_total": self.prompt_tokens_total,
                "cached_prompt_tokens_total": self.cached_prompt_tokens_total,
                "generated_tokens_total": self.generated_tokens_total,
                # prefix cache: admitted tokens looked up and found (a session's pin counts as found)
                "prefix_cache_queries_total": scheduler.num_queried_tokens,
                "prefix_cache_hits_total": scheduler.num_hit_tokens,
                "prefix_cache_hit_rate": scheduler.num_hit_tokens / max(1, scheduler.num_queried_tokens),
                "kv_blocks_cached": bm.num_cached_blocks, "kv_blocks_evictable": bm.num_evictable_blocks,
                "kv_blocks_evicted_total": bm.num_evictions,
                # host swap pool (zeros without one)
                "cpu_blocks_total": swap.num_total_blocks if swap else 0,
                "cpu_blocks_free": swap.num_free_blocks if swap else 0,
                "swap_out_blocks_total": swap.num_blocks_swapped_out if swap else 0,
                "swap_in_blocks_total": swap.num_blocks_swapped_in if swap else 0}

    def reset_prefix_cache(self) -> int:
        """Drop the prefix cache's blocks that no request or session holds (benchmarks call it between
        runs of the same prompts, so that a run is not served from the one before); call it between
        steps. Returns how many blocks were dropped."""
        return self.block_manager.drop_cached_blocks()

    def abort_all(self, error: str) -> None:
        """End every unfinished request with finish_reason "error" (the engine is closing)."""
        for request_id in list(self._detokenizers):
            self.abort_request(request_id, "error", error)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._pending) or self._in_flight is not None

    def _resolve_overlap(self) -> bool:
        setting = self.config.overlap_schedule
        if setting is None:
            setting = self.executor.supports_overlap and self.executor.device_type == "cuda"
        elif setting and not self.executor.supports_overlap:
            logger.warning("overlap_schedule: the %s executor runs steps one after another",
                           type(self.executor).__name__)
            setting = False
        logger.info("host and device work of consecutive steps %s", "overlap" if setting else "do not overlap")
        return setting

    # ----------------------------------------------------------------- the step
    def step(self) -> List[RequestOutput]:
        if self.overlap:
            return self._overlapped_step()
        outputs, self._pending = self._pending, []
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            if scheduled.finished_request_ids:  # nothing to run, but the runner must forget these
                self.executor.execute(scheduled)
            return outputs
        try:
            FAULTS.check("execute")
            runner_output = self.executor.execute(scheduled)
        except ExecutorDeadError:
            raise  # no step can run any more: the engine thread stops (async_engine.py)
        except Exception:
            self._fail_steps([scheduled])
            return outputs + self._take_pending()
        return outputs + self._apply(scheduled, runner_output) + self._take_pending()

    def _overlapped_step(self) -> List[RequestOutput]:
        """Schedule and launch the next step, then turn the previous one's tokens into outputs."""
        outputs, self._pending = self._pending, []
        scheduled = self.scheduler.schedule()
        previous, self._in_flight = self._in_flight, None
        launched = False
        collecting = False
        try:
            if not scheduled.is_empty or scheduled.finished_request_ids:
                self.executor.prepare(scheduled)  # an empty step only tells the runner who left
            if not scheduled.is_empty:
                FAULTS.check("execute")
                self.executor.launch()
                launched = True
            collecting = True
            runner_output = self.executor.collect() if previous is not None else None
        except ExecutorDeadError:
            raise
        except Exception:
            failed = [] if scheduled.is_empty else [scheduled]
            if previous is not None and not collecting:  # this step failed; the one before may have run well
                try:
                    outputs += self._apply(previous, self.executor.collect())
                except Exception:
                    logger.exception("the step before failed too")
                    failed.insert(0, previous)
            elif previous is not None:  # the device failed on the step before
                failed.insert(0, previous)
                if launched:
                    self._drop_launched()
            self._fail_steps(failed)
            return outputs + self._take_pending()
        if launched:
            self._in_flight = scheduled
        if previous is not None:
            outputs += self._apply(previous, runner_output)
        return outputs + self._take_pending()

    def _drop_launched(self) -> None:
        """Forget the step launched last, whose requests are failed (its output is not trusted)."""
        try:
            self.executor.collect()
        except Exception:
            logger.exception("the step launched last failed too")

    def _fail_steps(self, steps: List[SchedulerOutput]) -> None:
        """Fail every request of the given steps (the executor raised while running them)."""
        request_ids = list(dict.fromkeys(rid for s in steps for rid in s.num_scheduled_tokens))
        logger.exception("engine step failed; failing its requests %s", request_ids)
        for scheduled in steps:
            self.scheduler.step_failed(scheduled)  # host copies this step was to make are not trusted
        FAULTS.check("recovery")
        for request_id in request_ids:
            self.fail_request(request_id, STEP_FAILED)

    def _apply(self, scheduled: SchedulerOutput, runner_output: RunnerOutput) -> List[RequestOutput]:
        """The outputs of an executed step: its tokens applied, detokenized, stop words found."""
        outputs: List[RequestOutput] = []
        received = self.scheduler.update(scheduled, runner_output)
        for request, text in zip(received, self._new_texts(received)):
            try:
                FAULTS.check("output")
                if isinstance(text, Exception):
                    raise text
                outputs.append(self._token_output(request, text, runner_output.logprobs.get(request.request_id)))
                outputs[-1].prompt_logprobs = runner_output.prompt_logprobs.get(request.request_id)
            except Exception:
                logger.exception("request %d failed while its output was made", request.request_id)
                self.fail_request(request.request_id, OUTPUT_FAILED, request)
        return outputs

    def _new_texts(self, requests: List[Request]) -> list:
        """The text of each request's newest token (or the exception detokenizing it raised),
        decoded for all of them in one batch."""
        texts: list = [""] * len(requests)
        fed = []  # indices of the requests whose token goes to the detokenizer
        for i, request in enumerate(requests):
            token = request.output_token_ids[-1]
            ends_on_token = (request.is_finished and request.finish_reason == "stop"
                             and token in request.sampling.stop_token_ids)
            # A stop token's text shows only with include_stop_str_in_output (special tokens never do).
            if not ends_on_token or request.gen_config.include_stop_str_in_output:
                fed.append(i)
        decoded = add_tokens([self._detokenizers[requests[i].request_id] for i in fed],
                             [requests[i].output_token_ids[-1] for i in fed])
        for i, text in zip(fed, decoded):
            texts[i] = text
        return texts

    def _take_pending(self) -> List[RequestOutput]:
        pending, self._pending = self._pending, []
        return pending

    def fail_request(self, request_id: int, error: str, request: Optional[Request] = None) -> None:
        """End a request with finish_reason "error": its blocks are freed and its caller gets a
        final output. Works whether or not the scheduler has already finished it (``request``
        names it then)."""
        known = self.scheduler.get_request(request_id)
        if known is not None:
            self.scheduler.finish_request(request_id, "error")
            request = known
        if self._detokenizers.pop(request_id, None) is not None and request is not None:
            self._pending.append(self._final_output(request, "error", error))

    def _token_output(self, request: Request, text: str, logprobs) -> RequestOutput:
        """The output of the request's newest token, whose text is ``text``; a stop word found in the
        text ends the request."""
        token = request.output_token_ids[-1]
        detok = self._detokenizers[request.request_id]
        self.generated_tokens_total += 1
        if len(request.output_token_ids) == 1:
            self.prompt_tokens_total += len(request.prompt_token_ids)
            self.cached_prompt_tokens_total += request.num_cached_tokens
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
            finish_reason=request.finish_reason, num_cached_tokens=request.num_cached_tokens)

    def _final_output(self, request: Request, reason: str, error: Optional[str] = None) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id, new_token_ids=[], new_text="",
            num_prompt_tokens=len(request.prompt_token_ids), num_generated_tokens=len(request.output_token_ids),
            finished=True, finish_reason=reason, error=error)

    def close(self) -> None:
        self.executor.close()
