"""Token embedding and the language-model head (which may share the embedding's weight).

Both hold their table [vocab, hidden] through a LinearMethod, like linear layers: the embedding
looks rows up (method.embedding), the head multiplies (method.apply), so a quantized table serves
both the same way.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .linear import LinearMethod, UnquantizedLinearMethod, onednn_linear


class VocabEmbedding(nn.Module):
    """forward: ids [num_tokens] int64 -> [num_tokens, hidden] (times `scale`, applied in the
    weight dtype as Gemma does, when given)."""

    def __init__(self, vocab_size: int, hidden_size: int, scale: Optional[float] = None,
                 linear_method: Optional[LinearMethod] = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.scale = scale
        self.linear_method = linear_method or UnquantizedLinearMethod()
        self.linear_method.create_weights(self, hidden_size, [vocab_size])

    def _scale_in(self, dtype: torch.dtype) -> float:
        # The scale rounded to float32 then to the model dtype, as Hugging Face's Gemma does
        # (sqrt(2048) in bfloat16 is 45.25, not 45.2548...); a Python float, so no tensor is made
        # per step (CUDA-graph safe).
        return float(torch.tensor(self.scale, dtype=torch.float32, device="cpu").to(dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        embeds = self.linear_method.embedding(self, input_ids)
        if self.scale is not None:
            embeds = embeds * self._scale_in(embeds.dtype)
        return embeds

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}, scale={self.scale}"


class LMHead(nn.Module):
    """logits = hidden @ W.T (W: [vocab, hidden]), returned in float32; optionally tanh-softcapped:
    cap * tanh(logits / cap). With `tied_to`, W is the embedding's table, applied through the
    embedding's method (no parameter of its own)."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: Optional[VocabEmbedding] = None,
                 softcap: Optional[float] = None, linear_method: Optional[LinearMethod] = None):
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.softcap = softcap
        self.tied = tied_to is not None
        self.packed_weight: Optional[torch.Tensor] = None  # oneDNN-packed copy (CPU float32), see pack()
        if tied_to is not None:
            self._embedding = [tied_to]  # a list keeps it out of this module's parameters / state
        else:
            self.linear_method = linear_method or UnquantizedLinearMethod()
            self.linear_method.create_weights(self, hidden_size, [vocab_size])

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
            logits = owner.linear_method.apply(owner, hidden, None).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}, tied={self.tied}, softcap={self.softcap}"
