"""Client-side serving metrics: one record per request, then a summary per run.

Pure Python (no numpy, no HTTP): unit-tested on synthetic timestamps. All times are seconds from
`time.perf_counter()`; the summary reports them in milliseconds.

Definitions (per request):
  TTFT   first chunk carrying content  -  the moment the request was sent
  ITL    intervals between consecutive content chunks; a chunk known to carry k tokens stands for k
         tokens, so it contributes k intervals of (gap / k): ITL is per token, comparable between
         servers that merge tokens into one chunk and servers that do not
  TPOT   (e2e - TTFT) / (output tokens - 1); undefined for a single output token
  e2e    end of the response stream  -  the moment the request was sent
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple


@dataclass
class RequestRecord:
    index: int  # position in the workload's request list
    sent_s: float = 0.0
    end_s: float = 0.0
    # (arrival time, tokens it carries) of every chunk with non-empty content, in arrival order
    chunks: List[Tuple[float, int]] = field(default_factory=list)
    usage_prompt_tokens: Optional[int] = None  # from the server's usage chunk, when it sends one
    usage_output_tokens: Optional[int] = None
    finish_reason: Optional[str] = None
    error: Optional[str] = None  # set <=> the request failed; failed requests stay in the list

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def output_tokens(self) -> int:
        """The server's count when it reports one, else the tokens counted in content chunks."""
        if self.usage_output_tokens is not None:
            return self.usage_output_tokens
        return sum(n for _, n in self.chunks)

    @property
    def ttft_s(self) -> Optional[float]:
        return self.chunks[0][0] - self.sent_s if self.chunks else None

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.sent_s

    @property
    def tpot_s(self) -> Optional[float]:
        ttft = self.ttft_s
        if ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - ttft) / (self.output_tokens - 1)

    def itls_s(self) -> List[float]:
        out: List[float] = []
        for (prev_t, _), (t, n) in zip(self.chunks, self.chunks[1:]):
            n = max(n, 1)
            out.extend([(t - prev_t) / n] * n)
        return out

    def to_json(self, run_start_s: float) -> dict:
        """Every measured number of the request (microseconds), times relative to its send except
        `sent_at_s` (relative to the run's start); `from_json` reads it back."""
        return {"index": self.index, "ok": self.ok, "error": self.error, "finish_reason": self.finish_reason,
                "output_tokens": self.output_tokens, "usage_prompt_tokens": self.usage_prompt_tokens,
                "usage_output_tokens": self.usage_output_tokens, "ttft_s": _round(self.ttft_s),
                "tpot_s": _round(self.tpot_s), "e2e_s": _round(self.e2e_s),
                "sent_at_s": _round(self.sent_s - run_start_s),
                "chunk_s": [round(t - self.sent_s, 6) for t, _ in self.chunks],
                "chunk_tokens": [n for _, n in self.chunks]}

    @classmethod
    def from_json(cls, data: dict) -> "RequestRecord":
        return cls(index=data["index"], sent_s=0.0, end_s=data["e2e_s"],
                   chunks=list(zip(data["chunk_s"], data["chunk_tokens"])),
                   usage_prompt_tokens=data["usage_prompt_tokens"], usage_output_tokens=data["usage_output_tokens"],
                   finish_reason=data["finish_reason"], error=data["error"])


def _round(x: Optional[float], digits: int = 6) -> Optional[float]:
    return None if x is None else round(x, digits)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics, as
    numpy.percentile's default; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def distribution_ms(values_s: Sequence[float]) -> Dict[str, Optional[float]]:
    """mean / p50 / p99 in milliseconds; None (JSON null) where there are no values."""
    if not values_s:
        return {"mean": None, "p50": None, "p99": None, "count": 0}
    ms = [v * 1000.0 for v in values_s]
    return {"mean": round(sum(ms) / len(ms), 3), "p50": round(percentile(ms, 50), 3),
            "p99": round(percentile(ms, 99), 3), "count": len(ms)}


def summarize(records: Sequence[RequestRecord], duration_s: float) -> dict:
    """One run's figures. Throughputs count completed requests only, over the run's wall time
    (first scheduled send to last response end), so failures lower them instead of vanishing."""
    done = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_counts = [r.usage_prompt_tokens for r in done]
    input_tokens = sum(prompt_counts) if done and None not in prompt_counts else None
    summary = {
        "requests": len(records),
        "completed": len(done),
        "failed": len(failed),
        "errors": dict(Counter(r.error for r in failed).most_common()),
        "duration_s": round(duration_s, 4),
        "request_throughput": round(len(done) / duration_s, 4) if duration_s > 0 else None,
        "output_tokens": output_tokens,
        "output_throughput": round(output_tokens / duration_s, 3) if duration_s > 0 else None,
        "input_tokens": input_tokens,
        "output_tokens_per_request": {"min": min((r.output_tokens for r in done), default=None),
                                      "max": max((r.output_tokens for r in done), default=None)},
        "ttft_ms": distribution_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": distribution_ms([r.tpot_s for r in done if r.tpot_s is not None]),
        "itl_ms": distribution_ms([x for r in done for x in r.itls_s()]),
        "e2e_ms": distribution_ms([r.e2e_s for r in done]),
    }
    if input_tokens is not None and duration_s > 0:
        summary["total_token_throughput"] = round((input_tokens + output_tokens) / duration_s, 3)
    return summary


def format_summary(label: str, summary: dict) -> str:
    """A few human-readable lines for the terminal."""
    def d(name: str) -> str:
        dist = summary[name]
        if dist["p50"] is None:
            return f"{name[:-3].upper()} n/a"
        return f"{name[:-3].upper()} p50 {dist['p50']:.1f} / p99 {dist['p99']:.1f} ms (mean {dist['mean']:.1f})"

    lines = [f"{label}: {summary['completed']}/{summary['requests']} requests ok, "
             f"{summary['failed']} failed, {summary['duration_s']:.2f} s",
             f"  {summary['request_throughput']} req/s, {summary['output_throughput']} output tok/s "
             f"({summary['output_tokens']} tokens)",
             f"  {d('ttft_ms')}; {d('tpot_ms')}",
             f"  {d('itl_ms')}; {d('e2e_ms')}"]
    for error, count in summary["errors"].items():
        lines.append(f"  FAILED x{count}: {error}")
    return "\n".join(lines)
