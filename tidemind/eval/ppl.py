"""Perplexity on windows of a text (the P1 workload), and beside it, as llama.cpp's perplexity
tool reports, the KL divergence from a reference model's token distributions and how often both
models' top-1 tokens agree.

The text is tokenized once (no special tokens); its first max_tokens tokens are cut into
non-overlapping windows of seq_len tokens; a tokenizer that starts prompts with BOS tokens gets
them in place of each window's first tokens (llama.cpp's convention). Every position but the last
predicts the next token:

    nll  = -log p(t[i+1] | t[..i])                              perplexity = exp(mean nll)
    KL   = sum_v p_ref(v) (log p_ref(v) - log p(v))              mean over positions, and its p99
    top1 = argmax p == argmax p_ref

Models run through the engine's ModelRunner (the configured device, dtype, attention and dense
backends, model format and KV cache settings), one window at a time on a KV cache just large enough.
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ..attention.base import layout_from_lists
from ..config import EngineConfig

LOGIT_ROWS = 256  # positions whose logits are held at once ([rows, vocab] float32 per model)


@dataclass(frozen=True)
class PPLSettings:
    dataset: str = "wikitext2"
    seq_len: int = 1024
    max_tokens: int = 65536


@dataclass
class PPLResult:
    model: str
    windows: int
    predicted_tokens: int
    perplexity: float
    seconds: float
    reference: Optional[str] = None
    reference_perplexity: Optional[float] = None
    kl_mean: Optional[float] = None
    kl_p99: Optional[float] = None
    top1_agreement: Optional[float] = None

    def lines(self) -> List[str]:
        out = [f"{self.model}: perplexity {self.perplexity:.4f} over {self.predicted_tokens} tokens "
               f"({self.windows} windows, {self.seconds:.0f} s)"]
        if self.reference is not None:
            out.append(f"reference {self.reference}: perplexity {self.reference_perplexity:.4f}; "
                       f"ln(PPL / PPL_ref) {math.log(self.perplexity / self.reference_perplexity):+.5f}")
            out.append(f"KL divergence mean {self.kl_mean:.6f}, p99 {self.kl_p99:.6f}; top-1 agreement "
                       f"{100 * self.top1_agreement:.2f}%")
        return out


def eval_windows(token_ids: List[int], bos_ids: List[int], seq_len: int, max_tokens: int) -> torch.Tensor:
    """[num_windows, seq_len] int64 (see the module docstring)."""
    usable = min(len(token_ids), max_tokens)
    count = usable // seq_len
    if count == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens (--max-tokens {max_tokens}), not one window of "
                         f"--seq-len {seq_len}; use a longer text or a shorter --seq-len")
    windows = torch.tensor(token_ids[:count * seq_len], dtype=torch.int64).view(count, seq_len).clone()
    if bos_ids:
        windows[:, :len(bos_ids)] = torch.tensor(bos_ids, dtype=torch.int64)
    return windows


def check_quant_policy(quant_policy: int) -> dict:
    """EngineConfig fields for --quant-policy (EngineConfig says what this build can run)."""
    if quant_policy not in (0, 4, 8):
        raise ValueError(f"--quant-policy {quant_policy} is not one of 0, 4, 8")
    return {"quant_policy": quant_policy} if quant_policy else {}


class WindowScorer:
    """One model on the engine's runner, scoring windows of seq_len tokens."""

    def __init__(self, model_path: str, config: EngineConfig, seq_len: int):
        from ..runner.device import checkpoint_dtype, resolve_device, resolve_dtype
        from ..runner.model_runner import ModelRunner

        device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype, checkpoint_dtype(model_path), device)
        blocks = -(-seq_len // config.cache_block_seq_len)
        config = dataclasses.replace(config, num_gpu_blocks=blocks)
        self.runner = ModelRunner(model_path, device, dtype, config.attention_backend, config.model_format)
        self.runner.init_kv_cache(config, session_len=seq_len, max_batch_size=1)
        self.device = device
        self.block_table = list(range(blocks))

    @torch.inference_mode()
    def hidden(self, window: torch.Tensor) -> torch.Tensor:
        """[seq_len, hidden] final hidden states of one window."""
        runner = self.runner
        length = window.numel()
        layout = layout_from_lists([length], [length], [self.block_table], runner.kv_spec.block_size, self.device)
        meta = runner.attention.build_metadata(layout)
        positions = torch.arange(length, device=self.device)
        return runner.model(window.to(self.device), positions, runner.kv_caches, meta)

    @torch.inference_mode()
    def log_probs(self, hidden: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        return torch.log_softmax(self.runner.model.compute_logits(hidden[start:stop]), dim=-1)

    def close(self) -> None:
        self.runner.close()


def _chunks(length: int) -> Iterator[tuple]:
    for start in range(0, length - 1, LOGIT_ROWS):
        yield start, min(start + LOGIT_ROWS, length - 1)


@dataclass(frozen=True)
class ModelSpec:
    path: str  # a model directory
    config: EngineConfig
    name: str  # how results name it


@dataclass
class _Tally:
    nll: List[torch.Tensor] = dataclasses.field(default_factory=list)  # per chunk [rows] float64, on the CPU
    kl: List[torch.Tensor] = dataclasses.field(default_factory=list)
    agree: int = 0

    def add_nll(self, log_probs: torch.Tensor, targets: torch.Tensor) -> None:
        # log_probs [rows, vocab] of the positions before targets [rows]
        picked = log_probs.gather(1, targets.to(log_probs.device)[:, None]).squeeze(1)
        self.nll.append(-picked.double().cpu())

    def add_comparison(self, log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> None:
        self.kl.append((ref_log_probs.exp() * (ref_log_probs - log_probs)).sum(-1).double().cpu())
        self.agree += int((log_probs.argmax(-1) == ref_log_probs.argmax(-1)).sum())


def evaluate(models: Sequence[ModelSpec], windows: torch.Tensor, reference: Optional[ModelSpec] = None
             ) -> List[PPLResult]:
    """Score every window with each model, and with the reference beside them (computed once per
    window for all models)."""
    start_time = time.perf_counter()
    seq_len = windows.shape[1]
    scorers = [WindowScorer(m.path, m.config, seq_len) for m in models]
    ref_scorer = WindowScorer(reference.path, reference.config, seq_len) if reference is not None else None
    tallies, ref_tally = [_Tally() for _ in models], _Tally()
    try:
        for window in tqdm(windows, desc="Perplexity windows", unit="window"):
            hiddens = [scorer.hidden(window) for scorer in scorers]
            ref_hidden = ref_scorer.hidden(window) if ref_scorer is not None else None
            for start, stop in _chunks(seq_len):
                ref_lp = ref_scorer.log_probs(ref_hidden, start, stop) if ref_scorer is not None else None
                if ref_lp is not None:
                    ref_tally.add_nll(ref_lp, window[start + 1:stop + 1])
                for scorer, hidden, tally in zip(scorers, hiddens, tallies):
                    lp = scorer.log_probs(hidden, start, stop)  # [rows, vocab] float32, on the model's device
                    tally.add_nll(lp, window[start + 1:stop + 1])
                    if ref_lp is not None:
                        tally.add_comparison(lp, ref_lp.to(lp.device))
    finally:
        for scorer in scorers + ([ref_scorer] if ref_scorer is not None else []):
            scorer.close()
    seconds = time.perf_counter() - start_time
    results = []
    for spec, tally in zip(models, tallies):
        nll = torch.cat(tally.nll)
        result = PPLResult(model=spec.name, windows=windows.shape[0], predicted_tokens=nll.numel(),
                           perplexity=math.exp(nll.mean().item()), seconds=seconds)
        if reference is not None:
            kl = torch.cat(tally.kl)
            result.reference = reference.name
            result.reference_perplexity = math.exp(torch.cat(ref_tally.nll).mean().item())
            result.kl_mean = kl.mean().item()
            result.kl_p99 = torch.quantile(kl.float(), 0.99).item()
            result.top1_agreement = tally.agree / kl.numel()
        results.append(result)
    return results


def text_windows(model_path: str, settings: PPLSettings) -> torch.Tensor:
    """The evaluation windows of settings.dataset under the model's tokenizer."""
    from ..chat.tokenizer import Tokenizer
    from ..lite.data import load_text

    text, _ = load_text(settings.dataset)
    tokenizer = Tokenizer.from_pretrained(model_path)
    return eval_windows(tokenizer.encode(text, add_bos=False), tokenizer.encode("", add_bos=True), settings.seq_len,
                        settings.max_tokens)
