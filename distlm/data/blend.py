"""Which source each global position reads when several datasets are blended by weight.

The schedule is a pure function of ``(weights, seed, position)``, so every rank and loader worker
computes the same one without talking, and a resumed run (at any data-parallel size) continues
it exactly. Positions are cut into rounds of ``K`` rows:

* After ``r`` whole rounds, source ``s`` (other than the heaviest, ``a``) has had
  ``floor(r * K * w_s / W)`` rows and ``a`` the rest. Each count only grows with ``r``: the
  heaviest source's share of a round is at least ``K / S - (S - 1) > 0`` rows since
  ``K > S * (S - 1)``. So over any stretch of rounds the mix matches the weights to within one
  row per source.
* Inside round ``r`` its rows are dealt in an order permuted by a generator seeded from
  ``(seed, r)``, so sources interleave at row level instead of arriving in runs.

A position's row within its source is the source's count before the round plus how many of the
round's earlier slots went to that source: each source is read front to back, in its own order
(see :mod:`distlm.data.stream`), never skipping or repeating a row.

``base_row``/``base_counts`` start the schedule part-way: positions ``p >= base_row`` follow the
schedule of ``p - base_row`` with ``base_counts`` rows of each source already read. A run that
changes its weights on resume continues every source from its counter this way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

__all__ = ["BlendSchedule", "Source"]

@dataclass
class Source:
    """One dataset of a blend (``data.sources``), or the one of ``data.path``."""

    path: str
    """A folder or URL (``http(s)://``, ``file://``; ``pipe:`` with data.allow_pipe) written by ``distlm prepare``."""
    weight: float = 1.0
    """Share of the rows, relative to the other sources' weights."""
    name: Optional[str] = None
    """Label in logs, metrics and checkpoints; default the path's last part. Must be unique."""
    shards: Optional[str] = None
    """Brace pattern of the train shard URLs in manifest order, when the shards live apart from
    the manifest, e.g. ``https://host/ds/train-{000000..000099}.tar``."""

    @property
    def label(self) -> str:
        return self.name or os.path.basename(str(self.path).rstrip("/")) or str(self.path)


_ROUND_TAG = 2  # distinct from the stream's shard/window tags: another use of the same seed
_MIN_ROUND = 1024


class BlendSchedule:
    """Maps global positions to ``(source, row within that source)``; see the module docstring."""

    def __init__(self, weights: Sequence[float], seed: int, *, base_row: int = 0,
                 base_counts: Optional[Sequence[int]] = None):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) < 1 or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"blend weights must be positive numbers, got {list(weights)}")
        self.n_sources = len(w)
        self.share = w / w.sum()
        self.heaviest = int(np.argmax(w))
        self.seed = seed
        self.round = max(_MIN_ROUND, self.n_sources * self.n_sources)
        self.base_row = base_row
        self.base_counts = np.zeros(self.n_sources, np.int64) if base_counts is None else \
            np.asarray(base_counts, dtype=np.int64)
        if self.base_counts.shape != (self.n_sources,) or np.any(self.base_counts < 0):
            raise ValueError(f"base_counts must hold one count >= 0 per source, got {base_counts}")
        self._rounds: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def _counts_after_rounds(self, r: int) -> np.ndarray:
        """Rows each source has had in the first ``r`` rounds (relative to the base)."""
        n = r * self.round
        counts = np.floor(n * self.share).astype(np.int64)
        counts[self.heaviest] = 0
        counts[self.heaviest] = n - counts.sum()
        return counts

    def _round(self, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(source of each slot, its ordinal among that source's slots, counts before the round)."""
        if r not in self._rounds:
            before = self._counts_after_rounds(r)
            quota = self._counts_after_rounds(r + 1) - before
            slots = np.repeat(np.arange(self.n_sources), quota)
            slots = slots[np.random.default_rng([self.seed, _ROUND_TAG, r]).permutation(self.round)]
            # Ordinal of each slot within its source: stable sort groups a source's slots in order.
            order = np.argsort(slots, kind="stable")
            first_slot = np.concatenate([[0], np.cumsum(quota)[:-1]])
            ordinal = np.empty(self.round, np.int64)
            ordinal[order] = np.arange(self.round) - first_slot[slots[order]]
            if len(self._rounds) >= 4:  # positions move forward: only the latest rounds are asked again
                self._rounds.pop(min(self._rounds))
            self._rounds[r] = (slots, ordinal, before)
        return self._rounds[r]

    def locate(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Source and row within it for the global positions ``first .. first+count-1``."""
        if first < self.base_row:
            raise ValueError(f"position {first} is before this schedule's start ({self.base_row})")
        q = np.arange(first - self.base_row, first - self.base_row + count, dtype=np.int64)
        rounds, slot = np.divmod(q, self.round)
        source = np.empty(count, np.int64)
        row = np.empty(count, np.int64)
        for r in np.unique(rounds).tolist():
            here = rounds == r
            slots, ordinal, before = self._round(r)
            s = slots[slot[here]]
            source[here] = s
            row[here] = self.base_counts[s] + before[s] + ordinal[slot[here]]
        return source, row

    def counts(self, position: int) -> np.ndarray:
        """Rows of each source among the global positions before ``position``."""
        if position < self.base_row:
            raise ValueError(f"position {position} is before this schedule's start ({self.base_row})")
        r, j = divmod(position - self.base_row, self.round)
        slots, _, before = self._round(r)
        return self.base_counts + before + np.bincount(slots[:j], minlength=self.n_sources)
