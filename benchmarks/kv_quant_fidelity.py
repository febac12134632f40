"""KV cache quantization's fidelity: one model's perplexity with its KV cache unquantized (the
baseline), int8 and int4, and for each quantized policy the KL divergence from the baseline's
next-token distributions and how often the two agree on the top-1 token.

    python benchmarks/kv_quant_fidelity.py smollm2-135m                 # P1: 64 windows of 1,024 tokens
    python benchmarks/kv_quant_fidelity.py gemma3-270m --windows 16 --out gemma.json

P1 (benchmarks/WORKLOADS.md): WikiText-2 raw test (../shared/data), first 65,536 tokens in
non-overlapping 1,024-token windows; the text is tokenized once without special tokens and a
tokenizer that adds a BOS token gets it in place of each window's first token (llama.cpp's
convention); every position but the last predicts the next one:

    nll = -log p(t[i+1] | t[..i])    perplexity = exp(mean nll)
    KL  = sum_v p_base(v) (log p_base(v) - log p(v)), mean over positions (and its 99th percentile)

One ModelRunner (the weights loaded once, the engine's device, dtype, attention and dense
backends) runs every window once per policy, each policy on a KV cache of its own, as one prefill
of the whole window: with a quantized cache every query reads the keys and values as the cache
stores them, the window's own included (what a decode step would read). The baseline is the model
as loaded (a GGUF dequantized to float32 on the CPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time

import torch

from tidemind.attention.base import layout_from_lists
from tidemind.chat.tokenizer import Tokenizer
from tidemind.config import EngineConfig
from tidemind.loader.resolve import resolve_model
from tidemind.runner.device import checkpoint_dtype, resolve_device, resolve_dtype
from tidemind.runner.kv_cache import allocate_kv_cache
from tidemind.runner.model_runner import ModelRunner

TEXT = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "wikitext-2-raw-test.txt")
LOGIT_ROWS = 256  # positions whose [rows, vocab] float32 log-probs are held at once, per policy


def windows_of(model_path: str, text_path: str, seq_len: int, count: int) -> torch.Tensor:
    """[count, seq_len] int64 token windows (see the module docstring)."""
    tokenizer = Tokenizer.from_pretrained(model_path)
    with open(text_path, encoding="utf-8") as f:
        ids = tokenizer.encode(f.read(), add_bos=False)
    if len(ids) < count * seq_len:
        raise SystemExit(f"{text_path} has {len(ids)} tokens, fewer than {count} windows of {seq_len}")
    windows = torch.tensor(ids[:count * seq_len], dtype=torch.int64).view(count, seq_len).clone()
    bos = tokenizer.encode("", add_bos=True)
    if bos:
        windows[:, :len(bos)] = torch.tensor(bos, dtype=torch.int64)
    return windows


@dataclasses.dataclass
class Tally:
    nll: list = dataclasses.field(default_factory=list)  # per chunk [rows] float64
    kl: list = dataclasses.field(default_factory=list)
    agree: int = 0

    def summary(self, base: "Tally") -> dict:
        nll = torch.cat(self.nll)
        out = {"perplexity": math.exp(nll.mean().item()), "predicted_tokens": nll.numel()}
        if self.kl:
            kl = torch.cat(self.kl)
            base_ppl = math.exp(torch.cat(base.nll).mean().item())
            out.update(ppl_change_pct=100 * (out["perplexity"] / base_ppl - 1), kl_mean=kl.mean().item(),
                       kl_p99=torch.quantile(kl.float(), 0.99).item(), top1_agreement=self.agree / kl.numel())
        return out


class PolicyRunner:
    """The model once, and one KV cache per quant policy sized for one window."""

    def __init__(self, model_path: str, seq_len: int, policies, device_name: str, dtype_name: str):
        device = resolve_device(device_name)
        dtype = resolve_dtype(dtype_name, checkpoint_dtype(model_path), device)
        block_size = 64
        blocks = -(-seq_len // block_size)
        base = EngineConfig(device=device_name, dtype=dtype_name, num_gpu_blocks=blocks, cache_block_seq_len=block_size)
        self.runner = ModelRunner(model_path, device, dtype)
        spec = self.runner.init_kv_cache(base, session_len=seq_len, max_batch_size=1)
        self.caches = {p: allocate_kv_cache(dataclasses.replace(spec, quant_policy=p), self.runner.model_config,
                                            dtype, device) for p in policies}
        self.device, self.block_size, self.table = device, block_size, list(range(blocks))

    @torch.inference_mode()
    def hidden(self, window: torch.Tensor, policy: int) -> torch.Tensor:
        """[seq_len, hidden] final hidden states of one window, prefilled on the policy's cache."""
        length = window.numel()
        layout = layout_from_lists([length], [length], [self.table], self.block_size, self.device)
        meta = self.runner.attention.build_metadata(layout)
        positions = torch.arange(length, device=self.device)
        return self.runner.model(window.to(self.device), positions, self.caches[policy], meta)

    @torch.inference_mode()
    def log_probs(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return torch.log_softmax(self.runner.model.compute_logits(hidden[start:stop]).float(), dim=-1)


def evaluate(runner: PolicyRunner, windows: torch.Tensor, policies, report) -> dict:
    tallies = {p: Tally() for p in policies}
    seq_len = windows.shape[1]
    start_time = time.perf_counter()
    for w, window in enumerate(windows):
        hiddens = {p: runner.hidden(window, p) for p in policies}
        for start in range(0, seq_len - 1, LOGIT_ROWS):
            stop = min(start + LOGIT_ROWS, seq_len - 1)
            targets = window[start + 1:stop + 1].to(runner.device)[:, None]
            base_lp = runner.log_probs(hiddens[0], start, stop)
            for p in policies:
                lp = base_lp if p == 0 else runner.log_probs(hiddens[p], start, stop)
                tallies[p].nll.append(-lp.gather(1, targets).squeeze(1).double().cpu())
                if p:
                    tallies[p].kl.append((base_lp.exp() * (base_lp - lp)).sum(-1).double().cpu())
                    tallies[p].agree += int((lp.argmax(-1) == base_lp.argmax(-1)).sum())
        results = {f"quant_policy {p}": tallies[p].summary(tallies[0]) for p in policies}
        results["windows"] = w + 1
        results["seconds"] = time.perf_counter() - start_time
        report(results)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a bundled name (smollm2-135m, gemma3-270m), a .gguf file or a directory")
    parser.add_argument("--windows", type=int, default=64, help="windows of --seq-len tokens (P1: 64)")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--policies", default="0,8,4", help="quant policies; 0 (the baseline) is always run")
    parser.add_argument("--text", default=TEXT)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", default=None, help="JSON file rewritten after every window")
    args = parser.parse_args()
    policies = sorted({0} | {int(p) for p in args.policies.split(",")}, key=lambda p: (p != 0, -p))
    model_path = resolve_model(args.model).path
    windows = windows_of(model_path, args.text, args.seq_len, args.windows)
    runner = PolicyRunner(model_path, args.seq_len, policies, args.device, args.dtype)
    meta = {"model": args.model, "dtype": str(runner.runner.dtype), "seq_len": args.seq_len,
            "cmd": "python benchmarks/kv_quant_fidelity.py " + " ".join(os.sys.argv[1:])}

    def report(results: dict) -> None:
        line = "; ".join(f"{k}: ppl {v['perplexity']:.4f}" + (f" ({v['ppl_change_pct']:+.2f}%, KL {v['kl_mean']:.5f}, "
                                                               f"top-1 {100 * v['top1_agreement']:.2f}%)"
                                                               if "kl_mean" in v else "")
                         for k, v in results.items() if k.startswith("quant_policy"))
        print(f"window {results['windows']}/{len(windows)} ({results['seconds']:.0f} s): {line}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**meta, **results}, f, indent=2)

    evaluate(runner, windows, policies, report)


if __name__ == "__main__":
    main()
