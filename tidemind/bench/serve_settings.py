"""Settings of `tidemind bench serve`: the S1 / C2 workloads' defaults, the request bodies and the
arrival times. Light imports only (the CLI builds its parser from this)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

# the workloads' defaults; concurrency 0 = no limit on requests in flight
SERVE_WORKLOADS = {
    "C2": dict(endpoint="/v1/chat/completions", num_prompts=32, max_tokens=128, rates=[math.inf], concurrency=16,
               description="the 32 chat prompts of benchmarks/prompts.jsonl, 16 concurrent streaming clients, "
                           "128 new tokens, ignore EOS"),
    "S1": dict(endpoint="/v1/completions", num_prompts=512, max_tokens=256, rates=[4.0, 16.0, math.inf],
               concurrency=0,
               description="the T1 requests (512 prompts of random token ids, lengths 128-1024, seed 0) as "
                           "token-id prompts, 256 new tokens, ignore EOS, Poisson arrivals (seed 0), streaming"),
}


@dataclass
class ServeBenchSettings:
    url: str
    workload: str = "C2"
    request_rates: Optional[List[float]] = None  # None: the workload's
    concurrency: Optional[int] = None  # None: the workload's; 0: unlimited
    num_prompts: Optional[int] = None
    max_tokens: Optional[int] = None
    model: Optional[str] = None  # None: the first model the server lists
    api_key: Optional[str] = None
    temperature: float = 0.0
    ignore_eos: bool = True
    extra_body: dict = field(default_factory=dict)
    vocab_size: int = 49152  # S1's random token ids are drawn below this
    seed: int = 0
    warmup: int = 1
    timeout_s: float = 600.0
    progress: bool = True
    label: Optional[str] = None  # names the runs in plots (e.g. the server)

    def resolved(self) -> "ServeBenchSettings":
        """A copy with the workload's defaults filled in and the values checked."""
        if self.workload not in SERVE_WORKLOADS:
            raise ValueError(f"unknown workload {self.workload!r}; choose one of {sorted(SERVE_WORKLOADS)}")
        spec = SERVE_WORKLOADS[self.workload]
        out = ServeBenchSettings(**{**asdict(self), "extra_body": dict(self.extra_body)})
        out.request_rates = list(self.request_rates or spec["rates"])
        out.concurrency = spec["concurrency"] if self.concurrency is None else self.concurrency
        out.num_prompts = spec["num_prompts"] if self.num_prompts is None else self.num_prompts
        out.max_tokens = spec["max_tokens"] if self.max_tokens is None else self.max_tokens
        if any(not r > 0 for r in out.request_rates):
            raise ValueError("--request-rate values must be > 0 (or inf: all requests at once)")
        if out.concurrency < 0 or out.num_prompts < 1 or out.max_tokens < 1:
            raise ValueError("--concurrency must be >= 0, --num-prompts and --max-tokens >= 1")
        return out


def request_bodies(settings: ServeBenchSettings, model: str) -> List[dict]:
    """The workload's request bodies, in order. C2 cycles through the 32 chat prompts when asked for
    more; S1 takes the first `num_prompts` T1 prompts (at most 512)."""
    from .workloads import chat_prompts, t1_prompts

    common = {"model": model, "max_tokens": settings.max_tokens, "temperature": settings.temperature,
              "stream": True, "stream_options": {"include_usage": True}}
    if settings.ignore_eos:
        common["ignore_eos"] = True  # tidemind, vLLM and llama.cpp's llama-server all read it
    common.update(settings.extra_body)
    if settings.workload == "C2":
        prompts = chat_prompts()
        return [{**common, "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
                for i in range(settings.num_prompts)]
    if settings.num_prompts > 512:
        raise ValueError("S1 has 512 requests; pass --num-prompts 512 or fewer")
    return [{**common, "prompt": ids} for ids in t1_prompts(settings.vocab_size, settings.num_prompts)]


def arrival_offsets(count: int, rate: float, seed: int) -> List[float]:
    """Send times (seconds from the run's start): a Poisson process of `rate` requests/s, the first
    request at 0; rate inf sends everything at once."""
    if math.isinf(rate):
        return [0.0] * count
    import numpy as np

    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=count)
    return [0.0] + np.cumsum(gaps[:-1]).tolist()


def rate_name(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"
