"""The training run's side of the data: which stream to read, where to resume it, what to record.

The loader's state is tiny and saved in every checkpoint (``TrainState.data``): the global rows
consumed, the blend's starting point, and per source its rows read, epoch and shuffle key.
Resuming with the same sources and weights continues the same global sequence (at any
data-parallel size). Changed weights, or sources added, removed or reordered, restart the blend
schedule at the resume point; each source that was there before keeps its shuffle key and
continues from its own counter (matched by name, else by path), so it repeats and skips no row.
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Optional

import numpy as np
import torch

from distlm.config import BatchLayout, Config, ConfigError, data_sources
from distlm.data.blend import Source
from distlm.data.masking import masking_for
from distlm.data.stream import TokenStream
from distlm.parallel.distributed import all_gather_objects, all_reduce_sum

__all__ = ["DataCounters", "DataDigest", "ResumePlan", "align_skipped_rows", "data_state", "resume_plan",
           "train_stream", "val_stream"]


class ResumePlan:
    """Where the blend starts (None: at row 0) and each known source's shuffle key, by label."""

    def __init__(self, blend_base: Optional[tuple[int, list[int]]] = None,
                 seed_keys: Optional[dict[str, list[int]]] = None):
        self.blend_base = blend_base
        self.seed_keys = seed_keys or {}


def _saved_source(saved: list[dict], src: Source) -> Optional[dict]:
    by_name = [s for s in saved if s["name"] == src.label]
    by_path = [s for s in saved if s["path"] == str(src.path)]
    return (by_name or by_path or [None])[0]


def resume_plan(cfg: Config, saved: dict, rows_consumed: int, log: Callable[[str], None]) -> ResumePlan:
    """How to continue the data from a checkpoint's loader state ``saved`` (see the module docstring)."""
    sources = data_sources(cfg.data)
    if rows_consumed == 0:
        return ResumePlan()
    if not saved:
        # Checkpoints from before blending read one dataset with the plain seed.
        if len(sources) > 1:
            raise ConfigError("this checkpoint predates data.sources and records no per-source position; resume "
                              "it with its data.path, let it save a checkpoint, then switch to data.sources")
        return ResumePlan()
    was = saved.get("sources", [])
    matched = [_saved_source(was, src) for src in sources]
    keys = {src.label: m["seed_key"] for src, m in zip(sources, matched) if m is not None and "seed_key" in m}
    now_sig = [[src.label, src.weight] for src in sources]
    was_sig = [[s["name"], s["weight"]] for s in was]
    if now_sig == was_sig:
        blend = saved.get("blend", {})
        base = (blend["base_row"], blend["base_counts"]) if blend.get("base_row") else None
        return ResumePlan(base, keys)
    counts = [m["rows"] if m is not None else 0 for m in matched]
    log(f"data sources or weights changed since the checkpoint ({was_sig} -> {now_sig}): the blend restarts at "
        f"row {rows_consumed:,}, each source continuing from its own counter "
        f"{dict(zip([s.label for s in sources], counts))}")
    return ResumePlan((rows_consumed, counts), keys)


def _objective(stream: TokenStream, cfg: Config) -> TokenStream:
    """Masked LM: the stream masks its rows (seeded by data.seed, the split and each row's position)."""
    stream.masking = masking_for(cfg.model.objective, stream.manifest, cfg.model.mask_prob, cfg.data.seed,
                                 stream.split_name)
    return stream


def train_stream(cfg: Config, layout: BatchLayout, rank: int, rows_consumed: int, plan: ResumePlan,
                 contiguous: bool = False) -> TokenStream:
    d = cfg.data
    return _objective(TokenStream(data_sources(d), "train", micro_batch_size=layout.micro_batch_size, dp_rank=rank,
                       dp_size=layout.dp, seed=d.seed, shuffle_blocks=d.shuffle_blocks, start_row=rows_consumed,
                       seq_len=cfg.train.seq_len, on_error=d.on_error, max_error_rate=d.max_error_rate,
                       allow_pipe=d.allow_pipe, blend_base=plan.blend_base, seed_keys=plan.seed_keys,
                       contiguous=contiguous), cfg)


def val_stream(cfg: Config, layout: BatchLayout, rank: int, split: str = "val") -> TokenStream:
    """The held-out rows in file order; several sources are blended with their training weights."""
    d = cfg.data
    return _objective(TokenStream(data_sources(d), split, micro_batch_size=layout.micro_batch_size, dp_rank=rank,
                                  dp_size=layout.dp, seed=d.seed, shuffle=False, seq_len=cfg.train.seq_len,
                                  on_error=d.on_error, max_error_rate=d.max_error_rate,
                                  allow_pipe=d.allow_pipe), cfg)


def data_state(stream: TokenStream, rows_consumed: int, errors: Optional[dict] = None) -> dict:
    """The loader's position (and the damaged-data counts so far), for the checkpoint and the metrics."""
    rows = stream.source_rows(rows_consumed)
    return {
        "rows_consumed": rows_consumed,
        "blend": {"base_row": stream.schedule.base_row, "base_counts": [int(c) for c in stream.schedule.base_counts]},
        "sources": [
            {"name": src.label, "path": str(src.path), "weight": src.weight, "rows": n,
             "tokens": n * stream.seq_len, "epoch": n // order.rows, "seed_key": [int(k) for k in key]}
            for src, order, n, key in zip(stream.sources, stream.orders, rows, stream.seed_keys)
        ],
        "errors": dict(errors or {}),
    }


class DataCounters:
    """Damaged data met by all ranks' loaders over the run: events by kind, and rows skipped.

    Several readers (ranks, loader workers) can meet the same damaged block; each reports an
    event ``(kind, url, block, epoch)`` and the events are gathered and counted once each, so
    the counts do not depend on the layout. Rank 0 logs each damaged shard once.
    """

    def __init__(self, saved: Optional[dict] = None, log: Callable[[str], None] = print,
                 counts_rows: bool = True) -> None:
        """``counts_rows``: whether this rank's skipped rows count; the other tp ranks and
        stages of a model replica read the same rows, so only one rank per replica does."""
        self.counts_rows = counts_rows
        self.totals: Counter = Counter(saved or {})
        self.seen: set[tuple] = set()
        self.new: set[tuple] = set()
        self.rows_skipped = 0
        self.logged: set[str] = set()
        self.log = log

    def add(self, errors: Optional[dict]) -> None:
        if errors:
            self.new.update(tuple(e) for e in errors.get("events", ()) if tuple(e) not in self.seen)
            if self.counts_rows:
                self.rows_skipped += errors.get("rows_skipped", 0)

    def global_totals(self, device: torch.device) -> dict:
        """Totals over all ranks so far (a collective: every rank calls it); only the non-zero kinds."""
        skipped = int(all_reduce_sum(torch.tensor([self.rows_skipped], dtype=torch.int64, device=device)).item())
        self.rows_skipped = 0
        for events in all_gather_objects(sorted(self.new)):
            for event in map(tuple, events):
                if event not in self.seen:
                    self.seen.add(event)
                    self.totals[event[0]] += 1
                    if event[1] not in self.logged:
                        self.logged.add(event[1])
                        self.log(f"data error ({event[0]}) in {event[1]}: its damaged rows are skipped "
                                 f"(data.on_error=skip); `distlm data verify` names every damaged shard")
        self.new.clear()
        self.totals["rows_skipped"] += skipped
        return {k: v for k, v in sorted(self.totals.items()) if v}


class DataDigest:
    """An order-free fingerprint of the rows trained on since the last log line, over all ranks.

    Each row's targets are reduced to one number (a dot product with fixed pseudo-random
    weights, modulo a prime); the interval's digest is the sum over its rows. It does not depend
    on how rows are split over ranks, micro-batches or workers, so two runs, or a run and its
    resumption on another number of processes, read the same rows exactly when their digests
    agree step by step. An interval also starts at each checkpoint, where a resumed run starts.
    Costs one integer multiply-add per token.
    """

    MODULUS = (1 << 31) - 1

    def __init__(self, seq_len: int) -> None:
        weights = np.random.default_rng(0x5EED).integers(1, 1 << 12, size=seq_len)
        self.weights = torch.from_numpy(weights.astype(np.int64))
        self.value = 0

    def add(self, targets: torch.Tensor) -> None:
        rows = (targets.to("cpu", torch.int64) + 101) * self.weights  # +101: masked rows (-100) count too
        self.value = (self.value + int((rows.sum(dim=1) % self.MODULUS).sum())) % self.MODULUS

    def restart(self) -> None:
        self.value = 0

    def global_value(self, device: torch.device) -> int:
        """Summed over all ranks (a collective: every rank calls it); then starts a new interval."""
        total = all_reduce_sum(torch.tensor([self.value], dtype=torch.int64, device=device))
        self.value = 0
        return int(total.item()) % self.MODULUS


def align_skipped_rows(micro_batches: list, group, device: torch.device) -> list:
    """Mask on every rank of a model replica the rows that any of them skipped as damaged.

    The tp ranks and pipeline stages of one replica read the same rows separately. A block that
    fails on one reader only (a remote read that gave up on one rank) would otherwise feed the
    tensor-parallel ranks different tokens, or the last stage targets that do not belong to the
    first stage's inputs. One small all-reduce (MAX) per step over the replica makes them agree.
    """
    skipped = torch.stack([mb.targets.eq(-100).all(dim=1) for mb in micro_batches]).to(device, torch.uint8)
    torch.distributed.all_reduce(skipped, op=torch.distributed.ReduceOp.MAX, group=group)
    aligned = []
    for mb, rows in zip(micro_batches, skipped.bool().cpu()):
        if rows.any():
            mb.inputs[rows] = 0
            mb.targets[rows] = -100
            mb = mb._replace(errors={**(mb.errors or {}), "rows_skipped": int(rows.sum())})
        aligned.append(mb)
    return aligned
