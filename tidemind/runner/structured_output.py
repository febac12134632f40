"""Constrained decoding: the grammar hook of the sampler (structured output, tool calls).

Rows whose SamplingParams carry a grammar hold a GrammarState (one llguidance matcher per request,
made when the request enters the runner's batch, dropped when it leaves). Each step:

    apply_grammar_masks(logits, inputs)   after bans, penalties and logit_bias: tokens the grammar
                                          does not allow next are set to -inf (one bit per token from
                                          llguidance, all rows' masks computed in parallel)
    GrammarState.advance(token)           the sampled token moves the matcher on (InputBatch.append_tokens)

Invariant: a matcher has consumed exactly the request's output tokens (a preempted request's matcher
is rebuilt and replays them), so its mask is the mask of the request's next token.
Rows without a grammar cost nothing here: they never reach this module (InputBatch.plain_greedy keeps
them on the argmax fast path, and apply_grammar_masks returns at once when no row has a grammar).

When the grammar is complete (or, defensively, broken) only the request's stop ids are allowed, so
the answer ends; a mask that allows nothing would otherwise let argmax pick token 0.
"""
from __future__ import annotations

import logging
import threading
from typing import Dict, List, Sequence

import numpy as np
import torch

from ..chat.grammar import GrammarError, compile_spec, ll_tokenizer
from .device import to_device

logger = logging.getLogger("tidemind")


class GrammarState:
    """One request's matcher. `stop_token_ids`: the ids that end the request (the sampler may pick
    them whenever the grammar is complete)."""

    def __init__(self, matcher, stop_token_ids: Sequence[int]):
        self.matcher = matcher
        self.stop_token_ids = sorted(stop_token_ids)

    @property
    def done(self) -> bool:
        """Complete (only a stop id may follow) or broken (reported once, then the answer ends)."""
        return self.matcher.is_stopped() or self.matcher.is_error()

    def advance(self, token_id: int) -> None:
        if token_id in self.stop_token_ids or self.done:
            return  # the request ends with this token; a stop id need not be in the grammar
        if not self.matcher.consume_token(token_id):
            logger.error("grammar rejected token %d: %s", token_id, self.matcher.get_error())


class GrammarCompiler:
    """Makes GrammarStates for one runner; llguidance's tokenizer is built on first use (about a
    second), so runners that never see a grammar never pay for it."""

    def __init__(self, model_path: str, vocab_size: int):
        self.model_path = model_path
        self.vocab_size = vocab_size
        self._tokenizer = None
        # spec -> a fresh matcher of it, which new requests deep-copy: the grammar is compiled once
        # (requests often share one) and its lexer states warm up across requests
        self._templates: Dict[str, object] = {}

    def state(self, spec: str, stop_token_ids: Sequence[int], output_token_ids: Sequence[int]) -> GrammarState:
        """A matcher for `spec` that has consumed `output_token_ids` (tokens of a preempted request)."""
        import llguidance

        if self._tokenizer is None:
            self._tokenizer = ll_tokenizer(self.model_path, self.vocab_size)
        template = self._templates.get(spec)
        if template is None:
            try:
                grammar = compile_spec(spec)
            except GrammarError as exc:  # the server and pipeline() check first: this is a backstop
                logger.error("a request's grammar cannot be compiled (%s): its answer ends at once", exc)
                grammar = llguidance.LLMatcher.grammar_from_regex("")
            template = self._templates[spec] = llguidance.LLMatcher(self._tokenizer, grammar)
        state = GrammarState(template.deep_copy(), stop_token_ids)
        for token in output_token_ids:
            state.advance(token)
        return state


def apply_grammar_masks(logits: torch.Tensor, inputs: Sequence) -> None:
    """-inf, in place, for every token the row's grammar does not allow next (rows with a grammar).

    logits: float32 [num_rows, vocab]; inputs: SamplingInputs, one per row (their .grammar)."""
    rows = [row for row, inp in enumerate(inputs) if inp.grammar is not None]
    if not rows:
        return
    import llguidance.torch as llg_torch

    vocab = logits.shape[1]
    states: List[GrammarState] = [inputs[row].grammar for row in rows]
    words = _bitmask(len(rows), vocab)  # int32 [R, ceil(vocab / 32)]: bit j of word w is token 32 w + j
    live = [(state.matcher, i) for i, state in enumerate(states) if not state.done]
    if live:
        llg_torch.fill_next_token_bitmask_par(_executor(), live, words)
    # little-endian words: byte k of word w holds tokens 32 w + 8 k .. + 7, lowest bit first
    allowed = np.unpackbits(words.numpy().view(np.uint8), axis=1, count=vocab, bitorder="little").view(bool)
    for i, state in enumerate(states):
        if state.done:
            allowed[i] = False  # its row of the buffer was not refilled
        if state.done or state.matcher.is_accepting():
            allowed[i, [t for t in state.stop_token_ids if t < vocab]] = True
    whole = len(rows) == logits.shape[0]
    rows_t = None if whole else to_device(rows, torch.long, logits.device)
    target = logits if whole else logits.index_select(0, rows_t)  # [R, vocab]
    if target.device.type == "cpu":  # numpy's masked write: several times faster than torch's on the CPU
        np.copyto(target.numpy(), -np.inf, where=~allowed)
    else:
        target.masked_fill_(torch.from_numpy(~allowed).to(target.device), float("-inf"))
    if not whole:
        logits.index_copy_(0, rows_t, target)


# Per engine thread (one process may run several engines): llguidance's thread pool for masks and the
# host buffer they are written to, made on first use.
_LOCAL = threading.local()


def _executor():
    import llguidance

    if getattr(_LOCAL, "executor", None) is None:
        _LOCAL.executor = llguidance.LLExecutor()
    return _LOCAL.executor


def _bitmask(num_rows: int, vocab: int) -> torch.Tensor:
    width = (vocab + 31) // 32
    buffer = getattr(_LOCAL, "bitmask", None)
    if buffer is None or buffer.shape[0] < num_rows or buffer.shape[1] != width:
        buffer = _LOCAL.bitmask = torch.zeros((max(num_rows, 32), width), dtype=torch.int32)
    return buffer[:num_rows]
