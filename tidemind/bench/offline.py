"""Time requests through the engine: wall time, output throughput, time to first token."""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from ..config import GenerationConfig
from ..engine.async_engine import AsyncEngine
from ..messages import RequestOutput


@dataclass
class RunStats:
    wall_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: List[float] = field(default_factory=list)  # per request, from submission
    decode_s: List[float] = field(default_factory=list)  # per request, first to last token
    # per request, each output's arrival (seconds from submission); kept only when asked for
    token_times_s: List[List[float]] = field(default_factory=list)
    # (seconds from the start, output tokens so far), at most ~500 points spread over the run
    token_curve: List[tuple] = field(default_factory=list)
    token_ids: List[List[int]] = field(default_factory=list)  # per request, what it generated

    @property
    def output_tok_s(self) -> float:
        return self.output_tokens / self.wall_s

    @property
    def total_tok_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.wall_s

    def decode_tok_s(self) -> float:
        """Batch-1 decode rate: tokens after the first over the time they took (median over requests)."""
        per_request = [(self.output_tokens / len(self.decode_s) - 1) / d for d in self.decode_s if d > 0]
        return statistics.median(per_request)

    def summary(self) -> Dict[str, float]:
        return {"wall_s": round(self.wall_s, 3), "prompt_tokens": self.prompt_tokens,
                "output_tokens": self.output_tokens, "output_tok_s": round(self.output_tok_s, 2),
                "total_tok_s": round(self.total_tok_s, 2),
                "ttft_p50_s": round(statistics.median(self.ttft_s), 4)}


def run_requests(engine: AsyncEngine, prompts: Sequence[Sequence[int]], gen_config: GenerationConfig,
                 on_finished: Optional[Callable[[], None]] = None, keep_token_times: bool = False) -> RunStats:
    """Submit every prompt at once and wait for all answers. on_finished() is called (in the
    engine thread) as each request ends: a progress bar's update, say."""
    lock = threading.Lock()
    done = threading.Event()
    first: Dict[int, float] = {}
    last: Dict[int, float] = {}
    times: Dict[int, List[float]] = {}
    tokens: Dict[int, List[int]] = {}
    generated: Dict[int, int] = {}
    curve: List[tuple] = [(0.0, 0)]
    total = [0]
    remaining = [len(prompts)]
    errors: List[str] = []

    def sink(out: RequestOutput) -> None:
        now = time.perf_counter()
        with lock:
            if out.new_token_ids:
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
                total[0] += len(out.new_token_ids)
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
                curve.append((now - start, total[0]))
                if keep_token_times:
                    times.setdefault(out.request_id, []).append(now - start)
            generated[out.request_id] = out.num_generated_tokens
            if out.finished:
                if out.error:
                    errors.append(out.error)
                remaining[0] -= 1
                if not remaining[0]:
                    done.set()
        if out.finished and on_finished is not None:
            on_finished()

    start = time.perf_counter()
    ids = [engine.submit(p, gen_config, sink) for p in prompts]
    done.wait()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} benchmark request(s) failed: {errors[0]}")
    return RunStats(wall_s=wall, prompt_tokens=sum(len(p) for p in prompts),
                    output_tokens=sum(generated[i] for i in ids),
                    ttft_s=[first[i] - start for i in ids], decode_s=[last[i] - first[i] for i in ids],
                    token_times_s=[times.get(i, []) for i in ids], token_curve=curve[::max(1, len(curve) // 500)],
                    token_ids=[tokens.get(i, []) for i in ids])
