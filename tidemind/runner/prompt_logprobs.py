"""Log-probabilities of prompt tokens (SamplingParams.prompt_logprobs; completions' echo with logprobs).

While a request's prompt is prefilled, the hidden state at position p already predicts token p + 1:
for the requests that ask, the runner turns those hidden states into log-probabilities (the actual
next prompt token's, plus the top alternatives), chunk by chunk, and hands the whole list over with
the request's first sampled token. Steps with no such request pay one emptiness check.

Per request the list has one entry per prompt token: None for token 0 (nothing predicts it) and for
tokens whose KV came from a cache instead of being computed (a session's history); else
{token_id: logprob} with the prompt token and the top `prompt_logprobs` alternatives. A request
re-prefilled after a preemption has sampled before: it is not watched again.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np
import torch

from ..messages import TokenLogprobs

CHUNK = 256  # positions turned into logits at once: [CHUNK, vocab] float32 at a time


class PromptLogprobs:
    def __init__(self):
        # batch row -> entries so far: entries[t] is prompt token t's, len(entries) the next to fill
        self._pending: Dict[int, List[Optional[TokenLogprobs]]] = {}

    def watch(self, row: int, new) -> None:
        """Called for each request entering the batch (NewRequestData `new`, now in `row`)."""
        if new.sampling.prompt_logprobs is not None and not new.output_token_ids:
            # token 0 and the tokens whose KV is already cached get None
            self._pending[row] = [None] * (new.num_computed_tokens + 1)

    def forget(self, row: int) -> None:
        self._pending.pop(row, None)

    def collect(self, model, hidden: torch.Tensor, batch, step) -> None:
        """Entries for the prompt positions this step computed (call before num_computed_tokens
        advances). hidden: [num_tokens, hidden_size] of the step, tokens in step order."""
        if not self._pending:
            return
        starts = step.layout.query_start_loc_host
        for i, (row, count) in enumerate(zip(step.scheduled_rows.tolist(), step.num_scheduled.tolist())):
            entries = self._pending.get(row)
            if entries is None:
                continue
            first = int(batch.num_computed_tokens[row])
            last = min(first + count, int(batch.num_prompt_tokens[row]) - 1)  # position p predicts token p + 1
            for begin in range(first, last, CHUNK):
                end = min(begin + CHUNK, last)
                rows = torch.arange(begin - first, end - first, device=hidden.device) + int(starts[i])
                entries.extend(_entries(model.compute_logits(hidden.index_select(0, rows)),
                                        batch.token_ids[row, begin + 1:end + 1], batch.params[row].prompt_logprobs))

    def take(self, request_ids: List[int], rows: np.ndarray) -> Dict[int, List[Optional[TokenLogprobs]]]:
        """request id -> its whole list, for the sampled rows (their prompts are done) that were watched."""
        if not self._pending:
            return {}
        return {rid: self._pending.pop(row) for rid, row in zip(request_ids, rows.tolist()) if row in self._pending}


def _entries(logits: torch.Tensor, targets: np.ndarray, num_top: int) -> List[TokenLogprobs]:
    """logits float32 [n, vocab] at n positions; targets [n] the prompt tokens that followed them."""
    logprobs = torch.log_softmax(logits, dim=-1)
    target_t = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.int64)).to(logits.device)
    chosen = logprobs.gather(1, target_t.unsqueeze(1)).squeeze(1).tolist()
    tops = [zip(i.tolist(), v.tolist()) for v, i in zip(*logprobs.topk(num_top, dim=-1))] if num_top else None
    out = []
    for j, token in enumerate(targets.tolist()):
        entry = {int(token): chosen[j]}
        for tid, value in (tops[j] if tops else ()):
            entry.setdefault(tid, value)
        out.append(entry)
    return out
