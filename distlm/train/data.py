"""The training run's side of the data: which stream to read, where to resume it, what to record.

The loader's state is tiny and saved in every checkpoint (``TrainState.data``): the global rows
consumed, and per source its rows read, epoch and the blend's starting point. Resuming with the
same sources and weights continues the same global sequence (at any data-parallel size).
Changed weights restart the blend schedule at the resume point, each source continuing from its
own counter, so no source repeats or skips rows.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

import numpy as np
import torch

from distlm.config import BatchLayout, Config, data_sources
from distlm.data.shards import ERROR_KINDS
from distlm.data.stream import TokenStream
from distlm.parallel.distributed import all_reduce_sum

__all__ = ["DataCounters", "DataDigest", "data_state", "train_stream", "val_stream"]


def _blend_base(cfg: Config, saved: dict, rows_consumed: int, log: Callable[[str], None]):
    """Where the blend schedule starts: the saved start if the sources are unchanged."""
    sources = data_sources(cfg.data)
    if not saved or rows_consumed == 0:
        return None
    now = [[s.label, s.weight] for s in sources]
    was = [[s["name"], s["weight"]] for s in saved.get("sources", [])]
    blend = saved.get("blend", {})
    if now == was:
        return (blend.get("base_row", 0), blend.get("base_counts") or None) if blend.get("base_row") else None
    rows_read = {s["name"]: s["rows"] for s in saved.get("sources", [])}
    counts = [rows_read.get(s.label, 0) for s in sources]
    log(f"data sources or weights changed since the checkpoint ({was} -> {now}): the blend restarts at row "
        f"{rows_consumed:,}, each source continuing from its own counter {dict(zip([s.label for s in sources], counts))}")
    return rows_consumed, counts


def train_stream(cfg: Config, layout: BatchLayout, rank: int, rows_consumed: int, saved: dict,
                 log: Callable[[str], None]) -> TokenStream:
    d = cfg.data
    return TokenStream(data_sources(d), "train", micro_batch_size=layout.micro_batch_size, dp_rank=rank,
                       dp_size=layout.dp, seed=d.seed, shuffle_blocks=d.shuffle_blocks, start_row=rows_consumed,
                       seq_len=cfg.train.seq_len, on_error=d.on_error, max_error_rate=d.max_error_rate,
                       allow_pipe=d.allow_pipe, blend_base=_blend_base(cfg, saved, rows_consumed, log))


def val_stream(cfg: Config, layout: BatchLayout, rank: int, split: str = "val") -> TokenStream:
    """The held-out rows in file order; several sources are blended with their training weights."""
    d = cfg.data
    return TokenStream(data_sources(d), split, micro_batch_size=layout.micro_batch_size, dp_rank=rank,
                       dp_size=layout.dp, seed=d.seed, shuffle=False, seq_len=cfg.train.seq_len,
                       on_error=d.on_error, max_error_rate=d.max_error_rate, allow_pipe=d.allow_pipe)


def data_state(stream: TokenStream, rows_consumed: int) -> dict:
    """The loader's position, for the checkpoint and the metrics."""
    rows = stream.source_rows(rows_consumed)
    return {
        "rows_consumed": rows_consumed,
        "blend": {"base_row": stream.schedule.base_row, "base_counts": [int(c) for c in stream.schedule.base_counts]},
        "sources": [
            {"name": src.label, "path": str(src.path), "weight": src.weight, "rows": n,
             "tokens": n * stream.seq_len, "epoch": n // order.rows}
            for src, order, n in zip(stream.sources, stream.orders, rows)
        ],
    }


class DataCounters:
    """Damaged-data events met by this rank's loader over the run, by kind, plus rows skipped."""

    KEYS = (*ERROR_KINDS, "rows_skipped")

    def __init__(self) -> None:
        self.total: Counter = Counter()

    def add(self, errors: Optional[dict]) -> None:
        if errors:
            self.total.update(errors)

    def global_totals(self, device: torch.device) -> dict:
        """Summed over all ranks (a collective: every rank calls it); only the non-zero kinds."""
        local = torch.tensor([float(self.total.get(k, 0)) for k in self.KEYS], dtype=torch.float64, device=device)
        summed = all_reduce_sum(local)
        return {k: int(round(v)) for k, v in zip(self.KEYS, summed.tolist()) if v}


class DataDigest:
    """An order-free fingerprint of the rows trained on since the last log line, over all ranks.

    Each row's targets are reduced to one number (a dot product with fixed pseudo-random
    weights, modulo a prime); the interval's digest is the sum over its rows. It does not depend
    on how rows are split over ranks, micro-batches or workers, so two runs, or a run and its
    resumption on another number of processes, read the same rows exactly when their digests
    agree step by step. Costs one integer multiply-add per token.
    """

    MODULUS = (1 << 31) - 1

    def __init__(self, seq_len: int) -> None:
        weights = np.random.default_rng(0x5EED).integers(1, 1 << 12, size=seq_len)
        self.weights = torch.from_numpy(weights.astype(np.int64))
        self.value = 0

    def add(self, targets: torch.Tensor) -> None:
        rows = (targets.to("cpu", torch.int64) + 101) * self.weights  # +101: masked rows (-100) count too
        self.value = (self.value + int((rows.sum(dim=1) % self.MODULUS).sum())) % self.MODULUS

    def global_value(self, device: torch.device) -> int:
        """Summed over all ranks (a collective: every rank calls it); then starts a new interval."""
        total = all_reduce_sum(torch.tensor([self.value], dtype=torch.int64, device=device))
        self.value = 0
        return int(total.item()) % self.MODULUS
