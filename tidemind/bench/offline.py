"""Time requests through the engine: wall time, output throughput, time to first token."""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Sequence

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


def run_requests(engine: AsyncEngine, prompts: Sequence[Sequence[int]], gen_config: GenerationConfig) -> RunStats:
    """Submit every prompt at once and wait for all answers."""
    lock = threading.Lock()
    done = threading.Event()
    first: Dict[int, float] = {}
    last: Dict[int, float] = {}
    generated: Dict[int, int] = {}
    tokens: Dict[int, List[int]] = {}
    remaining = [len(prompts)]
    errors: List[str] = []

    def sink(out: RequestOutput) -> None:
        now = time.perf_counter()
        with lock:
            if out.new_token_ids:
                first.setdefault(out.request_id, now)
                last[out.request_id] = now
                tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            generated[out.request_id] = out.num_generated_tokens
            if out.finished:
                if out.error:
                    errors.append(out.error)
                remaining[0] -= 1
                if not remaining[0]:
                    done.set()

    start = time.perf_counter()
    ids = [engine.submit(p, gen_config, sink) for p in prompts]
    done.wait()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} benchmark request(s) failed: {errors[0]}")
    return RunStats(wall_s=wall, prompt_tokens=sum(len(p) for p in prompts),
                    output_tokens=sum(generated[i] for i in ids),
                    ttft_s=[first[i] - start for i in ids], decode_s=[last[i] - first[i] for i in ids],
                    token_ids=[tokens[i] for i in ids])
