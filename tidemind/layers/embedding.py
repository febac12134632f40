"""Token embedding and the language-model head (which may share the embedding's weight).

Both hold their table [vocab, hidden] through a LinearMethod, like linear layers: the embedding
looks rows up (method.embedding), the head multiplies (method.apply), so a quantized table serves
both the same way.

Vocabulary-parallel over a `tp` group of N ranks (layers/parallel.py): rank r holds rows
[r * V', r * V' + held) of the table, V' = ceil(vocab / N), padded with zero rows to V'. The
embedding looks up the ids in its range (others read row 0 and are zeroed) and all-reduces: every
token's row comes from exactly one rank, the others add zeros, so the sum is exact. The head
multiplies by its rows and all-gathers the logits [rows, V' * N], cut back to the vocabulary.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .linear import (LinearMethod, UnquantizedLinearMethod, check_shape, default_weight_loader, onednn_linear,
                     param_layout)
from .parallel import SINGLE_RANK, TPGroup, vocab_range


class VocabParallelTable(nn.Module):
    """A [vocab, hidden] table through a LinearMethod, holding this rank's vocabulary rows."""

    def __init__(self, vocab_size: int, hidden_size: int, linear_method: Optional[LinearMethod],
                 tp: Optional[TPGroup]):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.tp = tp or SINGLE_RANK
        # rows [vocab_start, vocab_start + num_rows) of the vocabulary, padded to rows_per_rank
        self.vocab_start, self.num_rows, self.rows_per_rank = vocab_range(vocab_size, self.tp.rank, self.tp.size)
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, hidden_size, [self.rows_per_rank])

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        layout = param_layout(self, param)
        if self.tp.size == 1 or layout.output_dim is None:
            default_weight_loader(param, loaded_weight, shard_id)
            return
        dim = layout.output_dim
        full = layout.shard_slice(0, self.vocab_size)[1]
        if loaded_weight.dim() <= dim or loaded_weight.shape[dim] != full:
            check_shape("vocabulary table", tuple(param.shape[:dim]) + (full,) + tuple(param.shape[dim + 1:]),
                        loaded_weight.shape)
        held = layout.shard_slice(0, self.num_rows)[1]
        target = param.data.narrow(dim, 0, held)
        part = loaded_weight.narrow(dim, *layout.shard_slice(self.vocab_start, self.num_rows))
        check_shape("vocabulary rows", target.shape, part.shape)
        target.copy_(part)
        param.data.narrow(dim, held, param.shape[dim] - held).zero_()  # padding rows: zero logits, never looked up


class VocabEmbedding(VocabParallelTable):
    """forward: ids [num_tokens] int64 -> [num_tokens, hidden] (times `scale`, applied in the
    weight dtype as Gemma does, when given)."""

    def __init__(self, vocab_size: int, hidden_size: int, scale: Optional[float] = None,
                 linear_method: Optional[LinearMethod] = None, tp: Optional[TPGroup] = None):
        super().__init__(vocab_size, hidden_size, linear_method, tp)
        self.scale = scale

    def _scale_in(self, dtype: torch.dtype) -> float:
        # The scale rounded to float32 then to the model dtype, as Hugging Face's Gemma does
        # (sqrt(2048) in bfloat16 is 45.25, not 45.2548...); a Python float, so no tensor is made
        # per step (CUDA-graph safe).
        return float(torch.tensor(self.scale, dtype=torch.float32, device="cpu").to(dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            embeds = self.linear_method.embedding(self, input_ids)
        else:
            local = input_ids - self.vocab_start
            outside = (local < 0) | (local >= self.num_rows)  # ids another rank looks up
            embeds = self.linear_method.embedding(self, local.masked_fill(outside, 0))
            embeds = self.tp.all_reduce(embeds.masked_fill_(outside.unsqueeze(-1), 0))
        if self.scale is not None:
            embeds = embeds * self._scale_in(embeds.dtype)
        return embeds

    def extra_repr(self) -> str:
        rows = f", rows [{self.vocab_start}, {self.vocab_start + self.num_rows})" if self.tp.size > 1 else ""
        return f"{self.vocab_size}, {self.hidden_size}, scale={self.scale}{rows}"


class LMHead(VocabParallelTable):
    """logits = hidden @ W.T (W: [vocab, hidden]), returned in float32; optionally tanh-softcapped:
    cap * tanh(logits / cap). With `tied_to`, W is the embedding's table, applied through the
    embedding's method (no parameter of its own; the embedding's rows are this rank's rows too)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: Optional[VocabEmbedding] = None,
                 softcap: Optional[float] = None, linear_method: Optional[LinearMethod] = None,
                 tp: Optional[TPGroup] = None):
        nn.Module.__init__(self)
        self.softcap = softcap
        self.tied = tied_to is not None
        self.packed_weight: Optional[torch.Tensor] = None  # oneDNN-packed copy (CPU float32), see pack()
        if tied_to is not None:
            self.vocab_size, self.hidden_size, self.tp = vocab_size, hidden_size, tied_to.tp
            self._embedding = [tied_to]  # a list keeps it out of this module's parameters / state
        else:
            super().__init__(vocab_size, hidden_size, linear_method, tp)

    @property
    def table_owner(self) -> nn.Module:
        """The module whose method and parameters hold W: the tied embedding, or this head."""
        return self._embedding[0] if self.tied else self

    @property
    def effective_weight(self) -> torch.Tensor:
        return self.table_owner.weight

    def pack(self, pack_for_batch: int) -> None:
        """Keep a oneDNN-packed copy of a dense weight for the matmul (the dense one stays: a tied
        embedding still looks rows up in it). Quantized tables are left to their method."""
        if type(self.table_owner.linear_method) is UnquantizedLinearMethod:
            self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(self.effective_weight.data, pack_for_batch)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [num_rows, hidden] -> [num_rows, vocab] float32
        if self.packed_weight is not None:
            logits = onednn_linear(hidden, self.packed_weight, None)
        else:
            owner = self.table_owner
            logits = owner.linear_method.apply(owner, hidden, None)
        logits = logits.float()
        if self.tp.size > 1:  # [num_rows, rows_per_rank] on each rank -> [num_rows, rows_per_rank * tp]
            logits = self.tp.all_gather(logits)
            if logits.shape[-1] != self.vocab_size:
                logits = logits[:, :self.vocab_size].contiguous()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}, tied={self.tied}, softcap={self.softcap}"
