"""Results files of `tidemind bench serve`: the JSON and its plots (matplotlib, no display)."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .serve_metrics import RequestRecord


def output_paths(out: str) -> Tuple[Path, Path]:
    """(JSON path, PNG path): `--out x.json` or `--out x` -> x.json and x.png, folders created."""
    path = Path(out)
    if path.suffix.lower() != ".json":
        path = path.with_name(path.name + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path, path.with_suffix(".png")


# a JSON array of numbers only (as json.dumps(indent=...) spreads it, one number per line)
_NUMBER_ARRAY = re.compile(r"\[(\s*-?[0-9][0-9.eE+-]*(?:,\s*-?[0-9][0-9.eE+-]*)*\s*)\]")


def dumps(result: dict) -> str:
    """Indented JSON with number arrays kept on one line (per-request chunk times stay small)."""
    text = json.dumps(result, indent=1, allow_nan=False)
    return _NUMBER_ARRAY.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def write_json(result: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(dumps(result) + "\n")
    os.replace(tmp, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _cdf(ax, values_ms: List[float], label: str) -> None:
    if not values_ms:
        return
    ordered = sorted(values_ms)
    n = len(ordered)
    ax.step(ordered, [(i + 1) / n for i in range(n)], where="post", label=label)


def plot_runs(result: dict, path: Path) -> None:
    """TTFT, TPOT and ITL CDFs (one line per run) and request / output-token throughput per run."""
    plt = _pyplot()
    runs = result["runs"]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    panels = (("ttft_s", "TTFT (ms)", axes[0][0]), ("tpot_s", "TPOT (ms)", axes[0][1]), ("itl_s", "ITL (ms)", axes[1][0]))
    for key, title, ax in panels:
        for run in runs:
            ok = [r for r in run["requests"] if r["ok"]]
            if key == "itl_s":
                values = [x * 1000 for r in ok for x in RequestRecord.from_json(r).itls_s()]
            else:
                values = [r[key] * 1000 for r in ok if r[key] is not None]
            _cdf(ax, values, run["label"])
        ax.set_xlabel(title)
        ax.set_ylabel("share of requests" if key != "itl_s" else "share of tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    ax = axes[1][1]
    labels = [f"rate={r['request_rate']}" for r in runs]
    x = range(len(runs))
    ax.bar([i - 0.2 for i in x], [r["summary"]["request_throughput"] or 0 for r in runs], 0.4, label="requests/s")
    ax.set_ylabel("requests/s")
    ax2 = ax.twinx()
    ax2.bar([i + 0.2 for i in x], [r["summary"]["output_throughput"] or 0 for r in runs], 0.4, color="tab:orange",
            label="output tokens/s")
    ax2.set_ylabel("output tokens/s")
    ax.set_xticks(list(x), labels)
    ax.legend(loc="upper left", fontsize=7)
    ax2.legend(loc="upper right", fontsize=7)
    failed = sum(r["summary"]["failed"] for r in runs)
    fig.suptitle(f"{result['workload']} against {result['url']} ({result['model']})"
                 + (f" -- {failed} FAILED requests" if failed else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# (summary key, statistic, panel title), laid out as two rows: throughputs and p50s, then p99s
COMPARED = (("request_throughput", None, "requests/s (higher is better)"),
            ("ttft_ms", "p50", "TTFT p50, ms (lower is better)"),
            ("tpot_ms", "p50", "TPOT p50, ms (lower is better)"),
            ("output_throughput", None, "output tokens/s (higher is better)"),
            ("ttft_ms", "p99", "TTFT p99, ms"), ("tpot_ms", "p99", "TPOT p99, ms"))


def compared_value(summary: dict, key: str, stat) -> float:
    value = summary[key] if stat is None else summary[key][stat]
    return float("nan") if value is None else float(value)


def plot_comparison(summaries: Dict[str, dict], title: str, path: Path,
                    rounds: Optional[Dict[str, List[dict]]] = None) -> None:
    """Side-by-side bars, one panel per figure of COMPARED, one bar per server; with `rounds`
    (server -> the summaries the bar sums up), each round is a dot on its bar."""
    plt = _pyplot()
    names = list(summaries)
    fig, axes = plt.subplots(2, len(COMPARED) // 2, figsize=(11, 7))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for ax, (key, stat, label) in zip(axes.flat, COMPARED):
        values = [compared_value(summaries[n], key, stat) for n in names]
        bars = ax.bar(range(len(names)), values, color=colors[: len(names)])
        ax.bar_label(bars, fmt=lambda v: f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}", fontsize=9)
        for i, name in enumerate(names):
            points = [compared_value(s, key, stat) for s in (rounds or {}).get(name, [])]
            ax.plot([i] * len(points), points, "k.", markersize=6)
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(label, fontsize=9)
        ax.margins(y=0.12)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
