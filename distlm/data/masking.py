"""BERT masking for ``model.objective=mlm`` (Devlin et al. 2019, section 3.1).

Each token is chosen for prediction with probability ``prob`` (15%); of the chosen ones 80%
become the mask id, 10% a random token and 10% stay as they were, so the model cannot learn
that only mask ids need predicting. The targets hold the original token where one was chosen
and -100 (ignored by the loss) everywhere else.

Document boundaries: rows are packed documents separated by EOS (``distlm prepare``). The
separators (and BOS/PAD/MASK ids) are never chosen and never drawn as random replacements: they
carry no content to predict, and a random EOS would fake a boundary. Attention is bidirectional
over the whole row, documents included (RoBERTa's FULL-SENTENCES packing); the EOS between
them tells the model where one ends.

The mask of a row is a function of (seed, split, the row's position in the stream) only: every
tensor-parallel rank and pipeline stage of a replica builds the same one without talking, a
resumed run masks its rows as the uninterrupted run did, and the same weights give the same
masked loss under any layout. Tokenizers without a mask token (byte, char) get one extra id,
one past the tokenizer's vocabulary: the model's embedding table has a row for it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import zlib

import numpy as np

IGNORE_INDEX = -100
_MLM_TAG = 5  # keeps these streams apart from the shuffles' (see distlm.data.stream's tags)


def mask_id_for(tokenizer: dict, vocab_size: int) -> int:
    """The tokenizer's mask id, else ``vocab_size`` (the extra id the model adds for it)."""
    mask_id = tokenizer.get("mask_id")
    return int(mask_id) if mask_id is not None else int(vocab_size)


def model_vocab_for_mlm(tokenizer: dict, vocab_size: int) -> int:
    """Rows the embedding table needs for masked LM: one more when the mask id is an added one."""
    return max(int(vocab_size), mask_id_for(tokenizer, vocab_size) + 1)


@dataclass(frozen=True)
class MLMMasking:
    """``apply(tokens, positions)`` -> (inputs, targets): BERT's 80/10/10 masking of int64 rows."""

    mask_id: int
    replacements: np.ndarray
    """Ids a chosen token may be replaced by at random: the tokenizer's, less the special ones."""
    never: np.ndarray
    """Ids never chosen for prediction: EOS (document boundaries), BOS, PAD and the mask id."""
    prob: float = 0.15
    seed: int = 0
    split_key: int = 0
    """Keeps the masks of the splits apart: validation row i is not masked like training row i."""

    @classmethod
    def for_tokenizer(cls, tokenizer: dict, vocab_size: int, prob: float = 0.15, seed: int = 0,
                      split: str = "train") -> "MLMMasking":
        """From a tokenizer summary (a manifest's ``tokenizer``, or ``to_dict()``) and its vocabulary size."""
        if not 0.0 < prob < 1.0:
            raise ValueError(f"mask probability must be in (0, 1); got {prob}")
        mask_id = mask_id_for(tokenizer, vocab_size)
        special = {tokenizer.get(key) for key in ("eos_id", "bos_id", "pad_id")} | {mask_id}
        special.discard(None)
        never = np.array(sorted(int(i) for i in special), dtype=np.int64)
        replacements = np.setdiff1d(np.arange(vocab_size, dtype=np.int64), never)
        if len(replacements) == 0:
            raise ValueError("the tokenizer has no ordinary ids to draw random replacements from")
        return cls(mask_id=mask_id, replacements=replacements, never=never, prob=float(prob), seed=int(seed),
                   split_key=split_key(split))

    @classmethod
    def for_manifest(cls, manifest, prob: float = 0.15, seed: int = 0, split: str = "train") -> "MLMMasking":
        return cls.for_tokenizer(manifest.tokenizer, manifest.vocab_size, prob, seed, split)

    def apply(self, tokens: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mask ``tokens`` [rows, T] (int64); row i's pattern is drawn from (seed, ``positions[i]``)."""
        inputs = tokens.copy()
        targets = np.full_like(tokens, IGNORE_INDEX)
        eligible = ~np.isin(tokens, self.never)
        for i, position in enumerate(np.asarray(positions, dtype=np.int64).tolist()):
            rng = np.random.default_rng([self.seed, _MLM_TAG, self.split_key, position])
            draw = rng.random((3, tokens.shape[1]))
            chosen = (draw[0] < self.prob) & eligible[i]
            to_mask = chosen & (draw[1] < 0.8)
            to_random = chosen & (draw[1] >= 0.8) & (draw[2] < 0.5)  # half of the other 20%
            targets[i, chosen] = tokens[i, chosen]
            inputs[i, to_mask] = self.mask_id
            inputs[i, to_random] = rng.choice(self.replacements, size=int(to_random.sum()))
        return inputs, targets


def split_key(split: str) -> int:
    """0 for the training split (so its masks do not depend on the names of the others), else a hash."""
    return 0 if split == "train" else zlib.crc32(split.encode("utf-8"))


def masking_for(objective: str, manifest, prob: float, seed: int, split: str) -> Optional[MLMMasking]:
    """The masking a data stream of ``split`` applies for ``model.objective`` (None for causal LM)."""
    return MLMMasking.for_manifest(manifest, prob, seed, split) if objective == "mlm" else None
