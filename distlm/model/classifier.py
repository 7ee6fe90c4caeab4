"""A sequence classifier: a pretrained :class:`~distlm.model.Transformer` body, pooling, a linear head.

The body's final-normed hidden states (``Transformer.features``) are pooled into one vector per
sequence, then dropout and ``nn.Linear(d_model, n_classes)`` give the class logits.

Pooling:

* ``last``: the hidden state of the last real token. In a causal (``clm``) body it is the only
  position that has read the whole text, so it is the natural summary (GPT-1's classifier).
* ``mean``: the mean over the real tokens. A bidirectional (``mlm``) body sees the whole text at
  every position, and the mean is the usual choice for it (no [CLS] token to read).

Batches are right-padded; ``keep`` marks the real tokens. Padding is never attended to and
never pooled, so a text's logits do not depend on what it is batched with.
"""

from __future__ import annotations

import torch
import torch.nn as nn

POOLINGS = ("last", "mean")


def default_pooling(objective: str) -> str:
    """``last`` for a causal body, ``mean`` for a bidirectional one (see the module docstring)."""
    return "last" if objective == "clm" else "mean"


def pool(hidden: torch.Tensor, keep: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per sequence [B, d] from hidden states [B, T, d] and the real-token mask [B, T]."""
    if pooling == "last":
        # Right padding: the last real token sits at (number of real tokens - 1).
        last = keep.long().sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    if pooling == "mean":
        # Summed in float32 whatever the hidden states' dtype: a bf16 sum over hundreds of positions
        # keeps about two significant digits.
        weights = keep.to(torch.float32).unsqueeze(-1)
        return (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")


class SequenceClassifier(nn.Module):
    """``model(tokens, keep)`` -> class logits [B, n_classes] (float32).

    ``body``: a one-process Transformer. ``max_len`` and ``pad_id`` travel with the model so that
    whoever predicts with it encodes texts the way it was trained. The head starts at zero, so
    the first predictions are uniform and the first gradients reach the head only: the
    pretrained features are not pushed around by a random head.
    """

    def __init__(self, body: nn.Module, n_classes: int, pooling: str, max_len: int, pad_id: int,
                 dropout: float = 0.1):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got {pooling!r}")
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes; got {n_classes}")
        self.body = body
        self.pooling = pooling
        self.max_len = max_len
        self.pad_id = pad_id
        self.dropout = nn.Dropout(dropout)
        self.score = nn.Linear(body.cfg.d_model, n_classes)
        nn.init.zeros_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    @property
    def n_classes(self) -> int:
        return self.score.out_features

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        hidden = self.body.features(tokens, keep)
        pooled = pool(hidden, keep, self.pooling)
        return self.score(self.dropout(pooled)).float()


def pad_batch(sequences: list, pad_id: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id sequences to the longest: (tokens [B, T] int64, keep [B, T] bool)."""
    longest = max(len(s) for s in sequences)
    tokens = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    keep = torch.zeros((len(sequences), longest), dtype=torch.bool)
    for i, seq in enumerate(sequences):
        tokens[i, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        keep[i, :len(seq)] = True
    return tokens.to(device), keep.to(device)
