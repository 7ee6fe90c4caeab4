"""Deterministic, resumable, data-parallel micro-batches from one or several prepared datasets.

The *global* sample order is a pure function of ``(seed, epoch, position)``; it does not
depend on how many ranks or loader workers read it:

* One source, epoch ``e`` (shuffle on): the shard order is permuted by a Generator seeded from
  ``(seed, e)``; blocks keep their order inside a shard. The resulting block sequence is cut
  into windows of ``shuffle_blocks`` consecutive blocks, and the rows of window ``w`` are
  permuted by a Generator seeded from ``(seed, e, w)``. Shuffle off: natural order.
  Source position ``q`` is row ``q % R`` of that order in epoch ``q // R`` (R rows per split);
  the stream never ends.
* Several sources (``data.sources``): a :class:`~distlm.data.blend.BlendSchedule` deals global
  positions to sources by weight; each source is read front to back in its own order as above
  (seeded from ``(seed, source index)``), its epochs counted on its own.
* Global micro-batch ``k`` is positions ``[start_row + k*G, start_row + (k+1)*G)`` with
  ``G = micro_batch_size * dp_size``; rank ``r`` takes the ``r``-th slice of ``micro_batch_size``.

So a run resumed with ``start_row`` = rows already consumed continues exactly where it stopped,
even with another ``dp_size``. Windowed shuffling keeps reads sequential: a reader decompresses
each block it needs from a window once, straight into the window's buffer, and skips (without
decompressing) blocks, windows and whole shards that hold none of its positions, finding them
from the manifest's row counts. Loader workers (:func:`make_loader`) take every
``num_workers``-th micro-batch of the rank.

Damaged data (see :class:`~distlm.data.shards.ShardError` for the kinds) either stops the run
(``on_error="fail"``) or is skipped (``"skip"``): the rows of a bad block keep their positions
but are masked (inputs 0, targets -100, which the loss ignores), so nothing shifts, nothing is
read twice, and every other rank and a resumed run still agree on the order. Each kind is
counted, each damaged shard logged once, and past ``max_error_rate`` of the rows the run stops.
"""

from __future__ import annotations

import functools
import hashlib
import os
import signal
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distlm.fault.preemption import ignore_in_worker

from .blend import BlendSchedule, Source
from .masking import MLMMasking
from .remote import expand_urls
from .shards import Manifest, ShardError, ShardReader, SplitInfo, load_manifest

__all__ = ["MicroBatch", "Source", "TokenStream", "make_loader", "ON_ERROR_CHOICES"]

ON_ERROR_CHOICES = ("fail", "skip")
IGNORE_INDEX = -100
"""Target of a masked (skipped) row: ``cross_entropy`` leaves it out."""

# Domain tags keep the two kinds of Generator seeds apart: numpy's SeedSequence pads short
# entropy with zeros, so (seed, e) and (seed, e, 0) would otherwise give the same stream.
_SHARD_ORDER_TAG = 0
_WINDOW_ORDER_TAG = 1
_SOURCE_TAG = 3


class MicroBatch(NamedTuple):
    """One rank's micro-batch: ``inputs``/``targets`` LongTensors ``[micro_batch_size, seq_len]``.

    ``errors``: None when nothing happened, else ``events`` (``(kind, url, block, epoch)`` of
    damaged data this reader met since its previous micro-batch; kinds are
    :data:`~distlm.data.shards.ERROR_KINDS`) and ``rows_skipped`` (masked rows of this batch).
    The training loop counts them (``DataCounters``), once per event over all readers.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    errors: Optional[dict] = None


DataSpec = Union[str, os.PathLike, Sequence[Source]]


def as_sources(data: DataSpec) -> list[Source]:
    if isinstance(data, (str, os.PathLike)):
        return [Source(os.fspath(data))]
    sources = list(data)
    if not sources:
        raise ValueError("no data sources given")
    labels = [s.label for s in sources]
    if len(set(labels)) != len(labels):
        raise ValueError(f"data sources need distinct names (set `name:` on each); got {labels}")
    return sources


def default_seed_key(seed: int, source: Source, n_sources: int) -> list[int]:
    """Entropy for one source's shuffles. A lone source uses the seed alone; in a blend each
    source's key comes from its label, not its place in the list, so reordering or adding
    sources leaves every source's order as it was. A resumed run takes the keys saved in its
    checkpoint (``seed_keys``), so a source keeps its order when a blend grows around it."""
    if n_sources == 1:
        return [seed]
    label_hash = int.from_bytes(hashlib.sha256(source.label.encode("utf-8")).digest()[:4], "little")
    return [seed, _SOURCE_TAG, label_hash]


@dataclass
class _EpochLayout:
    """Where the rows of one epoch come from, before the within-window permutation."""

    blocks: np.ndarray        # [n_blocks, 2]: (shard index, block index in shard), epoch order
    block_start: np.ndarray   # [n_blocks + 1]: first epoch offset of each block
    window_start: np.ndarray  # [n_windows + 1]: first epoch offset of each window


class SourceOrder:
    """The order in which one source's split visits its rows, epoch after epoch."""

    def __init__(self, source: Source, split: str, *, seed_key: list[int], shuffle: bool,
                 shuffle_blocks: int, allow_pipe: bool, require_files: bool = True):
        self.source = source
        self.manifest: Manifest = load_manifest(source.path, allow_pipe=allow_pipe)
        self.split: SplitInfo = self.manifest.split(split)
        if self.split.rows < 1:
            raise ValueError(f"split {split!r} of {self.manifest.location} has no rows; re-run `distlm prepare`")
        self.seed_key, self.shuffle, self.shuffle_blocks = seed_key, shuffle, shuffle_blocks
        self.rows = self.split.rows
        self.shard_urls = self._shard_urls(source, split, require_files)

    def _shard_urls(self, source: Source, split: str, require_files: bool) -> list[str]:
        """Where each shard is read from. ``require_files``: refuse missing local shards now
        (with on_error=skip they are found, counted and skipped when their turn comes)."""
        shards = self.split.shards
        if source.shards is None or split != "train":  # the pattern lists the train shards only
            urls = [self.manifest.shard_url(s) for s in shards]
            for url in urls if require_files else []:
                if "://" not in url and not url.startswith("pipe:") and not os.path.isfile(url):
                    raise ShardError(
                        f"shard {url} listed in {self.manifest.location}/manifest.json is missing; the dataset "
                        f"folder is incomplete: re-copy it or re-run `distlm prepare`", kind="missing", url=url)
            return urls
        urls = expand_urls(source.shards)
        if len(urls) != len(shards):
            raise ValueError(f"source {source.label}: shards pattern {source.shards!r} gives {len(urls)} URLs but "
                             f"split {split!r} of {self.manifest.location} has {len(shards)} shards")
        return urls

    def shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.split.shards)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([*self.seed_key, _SHARD_ORDER_TAG, epoch]).permutation(n)

    def window_perm(self, epoch: int, window: int, n_rows: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n_rows)
        return np.random.default_rng([*self.seed_key, _WINDOW_ORDER_TAG, epoch, window]).permutation(n_rows)

    def layout(self, epoch: int) -> _EpochLayout:
        blocks, rows = [], []
        for s in self.shard_order(epoch):
            n = len(self.split.shards[s].block_rows)
            blocks.append(np.stack([np.full(n, s), np.arange(n)], axis=1))
            rows.append(self.split.shards[s].block_rows)
        blocks_arr = np.concatenate(blocks).astype(np.int64)
        block_start = np.concatenate([[0], np.cumsum(np.concatenate(rows))]).astype(np.int64)
        n_blocks = len(blocks_arr)
        window_start = block_start[np.r_[np.arange(0, n_blocks, self.shuffle_blocks), n_blocks]]
        return _EpochLayout(blocks_arr, block_start, window_start)

    def row_order(self, epoch: int) -> np.ndarray:
        """Natural row indices (manifest order) in the order epoch ``epoch`` visits them.

        For inspection and tests; reading does not need it. Costs O(rows of the split).
        """
        rows_before = np.cumsum([0] + [s.rows for s in self.split.shards])
        natural_start = [rows_before[i] + np.concatenate([[0], np.cumsum(s.block_rows)])
                         for i, s in enumerate(self.split.shards)]
        layout = self.layout(epoch)
        out = []
        for w in range(len(layout.window_start) - 1):
            natural = [np.arange(natural_start[s][i], natural_start[s][i + 1])
                       for s, i in layout.blocks[w * self.shuffle_blocks:(w + 1) * self.shuffle_blocks]]
            natural_arr = np.concatenate(natural)
            out.append(natural_arr[self.window_perm(epoch, w, len(natural_arr))])
        return np.concatenate(out)


class TokenStream(IterableDataset):
    """Infinite :class:`MicroBatch` es ``[micro_batch_size, seq_len]`` for one rank.

    ``data``: a dataset folder/URL, or a list of :class:`Source` to blend by weight.
    ``inputs = row[:seq_len]``, ``targets = row[1:seq_len + 1]``; both are views of one int64
    copy of the rows. ``seq_len=None`` uses the manifest's; a smaller one truncates rows.
    ``blend_base``: ``(row, per-source counts)`` where the blend schedule starts (see
    :class:`~distlm.data.blend.BlendSchedule`); None starts it at row 0.
    ``masking``: for masked LM, ``inputs`` are ``row[:seq_len]`` masked and ``targets`` the
    original tokens where masked, -100 elsewhere (:mod:`distlm.data.masking`).
    See the module docstring for the order of samples and the error policy.
    """

    def __init__(
        self,
        data: DataSpec,
        split: str = "train",
        *,
        micro_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 1234,
        shuffle: bool = True,
        shuffle_blocks: int = 8,
        start_row: int = 0,
        seq_len: Optional[int] = None,
        on_error: str = "fail",
        max_error_rate: float = 0.01,
        allow_pipe: bool = False,
        blend_base: Optional[tuple[int, Sequence[int]]] = None,
        seed_keys: Optional[dict[str, list[int]]] = None,
        contiguous: bool = False,
        masking: Optional[MLMMasking] = None,
        log: Optional[Callable[[str], None]] = None,
    ):
        super().__init__()
        if micro_batch_size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
        if dp_size < 1 or not (0 <= dp_rank < dp_size):
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank}, dp_size={dp_size}")
        if shuffle_blocks < 1:
            raise ValueError(f"shuffle_blocks must be >= 1, got {shuffle_blocks}")
        if start_row < 0:
            raise ValueError(f"start_row must be >= 0, got {start_row}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0 (it seeds numpy's SeedSequence), got {seed}")
        if on_error not in ON_ERROR_CHOICES:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR_CHOICES)}, got {on_error!r}")
        if not 0 <= max_error_rate < 1:
            raise ValueError(f"max_error_rate must be in [0, 1), got {max_error_rate}")
        self.sources = as_sources(data)
        self.seed_keys = [(seed_keys or {}).get(src.label) or default_seed_key(seed, src, len(self.sources))
                          for src in self.sources]
        self.orders = [SourceOrder(src, split, seed_key=key, shuffle=shuffle, shuffle_blocks=shuffle_blocks,
                                   allow_pipe=allow_pipe, require_files=on_error == "fail")
                       for src, key in zip(self.sources, self.seed_keys)]
        first = self.orders[0].manifest
        for order in self.orders[1:]:
            m = order.manifest
            if (m.vocab_size, m.tokenizer) != (first.vocab_size, first.tokenizer) or m.dtype != first.dtype:
                raise ValueError(f"sources {self.sources[0].label} and {order.source.label} were prepared with "
                                 f"different tokenizers; blend only datasets prepared with the same tokenizer.json")
        if seq_len is None:
            seq_len = min(o.manifest.seq_len for o in self.orders)
        for order in self.orders:
            if not (1 <= seq_len <= order.manifest.seq_len):
                raise ValueError(
                    f"seq_len {seq_len} is not in 1..{order.manifest.seq_len}: rows of {order.manifest.location} "
                    f"hold {order.manifest.seq_len} + 1 tokens; re-run `distlm prepare --seq-len {seq_len}` for "
                    f"longer rows")
        self.split_name = split
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.shuffle_blocks = seed, shuffle, shuffle_blocks
        self.start_row = start_row
        self.seq_len = seq_len
        self.on_error, self.max_error_rate, self.allow_pipe = on_error, max_error_rate, allow_pipe
        self.contiguous = contiguous
        self.masking = masking
        self.log = log
        base_row, base_counts = blend_base if blend_base is not None else (0, None)
        if start_row < base_row:
            raise ValueError(f"start_row {start_row} is before the blend's start row {base_row}")
        self.schedule = BlendSchedule([s.weight for s in self.sources], seed, base_row=base_row,
                                      base_counts=base_counts)

    # ---- compatibility with single-dataset callers ------------------------------------------

    @property
    def manifest(self) -> Manifest:
        return self.orders[0].manifest

    @property
    def split(self) -> SplitInfo:
        return self.orders[0].split

    @property
    def rows_per_epoch(self) -> int:
        """Rows of the first source's split (the only one, unless blending)."""
        return self.orders[0].rows

    def row_order(self, epoch: int) -> np.ndarray:
        return self.orders[0].row_order(epoch)

    # ---- positions ------------------------------------------------------------------------

    @property
    def global_batch_size(self) -> int:
        """Rows consumed by all ranks per micro-batch step: ``micro_batch_size * dp_size``."""
        return self.micro_batch_size * self.dp_size

    def source_rows(self, position: int) -> list[int]:
        """Rows read from each source before global position ``position`` (for metrics and checkpoints)."""
        if len(self.sources) == 1:
            return [position - self.schedule.base_row + int(self.schedule.base_counts[0])]
        return [int(c) for c in self.schedule.counts(position)]

    # ---- reading --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[MicroBatch]:
        info = get_worker_info()
        if info is None:
            return self.worker_batches(0, 1)
        return _hand_over_errors(self.worker_batches(info.id, info.num_workers))

    def worker_batches(self, worker: int, n_workers: int) -> Iterator[MicroBatch]:
        """The micro-batches loader worker ``worker`` of ``n_workers`` produces: ``k = worker,
        worker + n_workers, ...`` of this rank. DataLoader takes them from its workers in turn."""
        if not 0 <= worker < n_workers:
            raise ValueError(f"need 0 <= worker < n_workers, got worker={worker}, n_workers={n_workers}")
        log = self.log or (lambda _message: None)
        readers = self.dp_size * n_workers
        cursors = [
            _Cursor(order, _ErrorPolicy(self.on_error, self.max_error_rate, -(-order.rows // readers),
                                        order.source.label, log), allow_pipe=self.allow_pipe)
            for order in self.orders
        ]
        m = self.micro_batch_size
        # Micro-batch k = worker, worker + n_workers, ...: its first position, then the stride.
        first = self.start_row + worker * self.global_batch_size + self.dp_rank * m
        step = n_workers * self.global_batch_size
        base = self.schedule.base_row
        try:
            if len(cursors) == 1:
                cursor = cursors[0]
                offset = int(self.schedule.base_counts[0]) - base
                while True:
                    rows, bad = cursor.take(first + offset, m)
                    cursor.policy.account(m, bad)
                    yield self._batch(rows, bad, cursors, first)
                    first += step
            while True:
                rows, bad = self._blended_rows(cursors, first)
                yield self._batch(rows, bad, cursors, first)
                first += step
        finally:
            for cursor in cursors:
                cursor.close()

    def _blended_rows(self, cursors: list["_Cursor"], first: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        m = self.micro_batch_size
        source, row = self.schedule.locate(first, m)
        out = np.empty((m, self.seq_len + 1), dtype=self.manifest.np_dtype)
        bad = None
        for s in np.unique(source).tolist():
            here = source == s
            rows, bad_here = cursors[s].gather(row[here])
            cursors[s].policy.account(len(rows), bad_here)
            out[here] = rows[:, : self.seq_len + 1]
            if bad_here is not None:
                bad = np.zeros(m, dtype=bool) if bad is None else bad
                bad[here] = bad_here
        return out, bad

    def _batch(self, rows: np.ndarray, bad: Optional[np.ndarray], cursors: list["_Cursor"], first: int) -> MicroBatch:
        L = self.seq_len
        if self.masking is not None:
            # Masked LM reads a row's first seq_len tokens, masked, and predicts the originals there.
            x, y = self.masking.apply(rows[:, :L].astype(np.int64), first + np.arange(len(rows)))
            x, y = torch.from_numpy(x), torch.from_numpy(y)
        elif self.contiguous:
            # For pinned memory and asynchronous copies to a GPU: two contiguous tensors.
            x, y = torch.from_numpy(rows[:, :L].astype(np.int64)), torch.from_numpy(rows[:, 1:L + 1].astype(np.int64))
        else:
            # One int64 copy; inputs and targets are views of it, shifted by one token (sliced
            # in numpy: a torch slice costs several times more per call).
            tokens = rows.astype(np.int64)
            x, y = torch.from_numpy(tokens[:, :L]), torch.from_numpy(tokens[:, 1:L + 1])
        errors = None
        for cursor in cursors:
            if cursor.policy.events:
                errors = errors or {"events": []}
                errors["events"] += cursor.policy.events
                cursor.policy.events = []
        if bad is not None and bad.any():
            if not self.contiguous and self.masking is None:
                y = y.clone()  # inputs and targets overlap in `tokens`: mask them apart
            mask = torch.from_numpy(bad)
            y[mask] = IGNORE_INDEX
            x[mask] = 0
            errors = errors or {}
            errors["rows_skipped"] = int(bad.sum())
        return MicroBatch(x, y, errors)

    def __repr__(self) -> str:
        data = self.sources[0].path if len(self.sources) == 1 else [(s.label, s.weight) for s in self.sources]
        return (
            f"TokenStream({data!r}, split={self.split_name!r}, "
            f"micro_batch_size={self.micro_batch_size}, dp_rank={self.dp_rank}, dp_size={self.dp_size}, "
            f"seed={self.seed}, shuffle={self.shuffle}, shuffle_blocks={self.shuffle_blocks}, "
            f"start_row={self.start_row}, seq_len={self.seq_len}, on_error={self.on_error!r})"
        )


def _hand_over_errors(batches: Iterator[MicroBatch]) -> Iterator[MicroBatch]:
    """In a loader worker: turn a ShardError into a last micro-batch that carries it.

    DataLoader re-raises a worker's exception from its message alone, losing the kind, URL and
    block; :func:`make_loader` raises it again, whole, in the training process.
    """
    try:
        yield from batches
    except ShardError as error:
        empty = torch.empty(0, dtype=torch.int64)
        yield MicroBatch(empty, empty, {"fatal": {"message": str(error), "kind": error.kind, "url": error.url,
                                                  "block": error.block}})


def _raise_handed_over(batches: Iterator[MicroBatch]) -> Iterator[MicroBatch]:
    for batch in batches:
        if batch.errors and "fatal" in batch.errors:
            fatal = batch.errors["fatal"]
            raise ShardError(fatal["message"], kind=fatal["kind"], url=fatal["url"], block=fatal["block"])
        yield batch


class _ErrorPolicy:
    """What one source's reader does with damaged data, and when it gives up.

    ``bad`` raises under ``fail``; under ``skip`` it records an *event* ``(kind, url, block,
    epoch)`` for the training process to count (which removes the duplicates that several
    readers meeting the same block report) and logs the shard once when a ``log`` is given.
    ``account`` tracks the rows this reader yields and how many were masked: past
    ``max_error_rate`` of them, and of at least this reader's share of an epoch (so one early bad
    block does not stop a run that has read little yet), the run stops.
    """

    def __init__(self, on_error: str, max_error_rate: float, share_rows: int, label: str,
                 log: Callable[[str], None]):
        self.on_error, self.max_error_rate, self.share_rows = on_error, max_error_rate, share_rows
        self.label, self.log = label, log
        self.yielded = 0
        self.masked = 0
        self.kinds: Counter = Counter()
        self.events: list[tuple] = []
        self.logged: set[str] = set()

    def bad(self, error: ShardError, epoch: int) -> None:
        if self.on_error == "fail":
            raise ShardError(f"{error} [data.on_error=fail: the run stops; set data.on_error=skip to skip "
                             f"damaged shards, up to data.max_error_rate of the rows]",
                             kind=error.kind, url=error.url, block=error.block) from error
        self.kinds[error.kind] += 1
        self.events.append((error.kind, error.url, -1 if error.block is None else error.block, epoch))
        if error.url not in self.logged:
            self.logged.add(error.url)
            self.log(f"data error ({error.kind}) in {error.url}: skipping its damaged rows: {error}")

    def account(self, rows: int, bad: Optional[np.ndarray]) -> None:
        self.yielded += rows
        if bad is None:
            return
        self.masked += int(bad.sum())
        rate = self.masked / max(self.yielded, self.share_rows)
        if rate > self.max_error_rate:
            kinds = ", ".join(f"{k} x{n}" for k, n in sorted(self.kinds.items()))
            kind = next(iter(self.kinds), "missing")
            raise ShardError(
                f"source {self.label}: {self.masked:,} of {max(self.yielded, self.share_rows):,} rows read are "
                f"damaged ({rate:.2%}), more than data.max_error_rate={self.max_error_rate:.2%} ({kinds}); run "
                f"`distlm data verify` on the dataset and re-copy or re-prepare the shards it names", kind=kind)


class _Window:
    """One shuffling window of a source's epoch: its blocks, in block order, and its permutation.

    ``rows`` holds the window's rows in block order (block ``bp`` fills
    ``rows[starts[bp]:starts[bp+1]]``); window position ``j`` reads row ``perm[j]``. Blocks are
    decompressed straight into ``rows`` lazily, only when a wanted row lies in them, each once.
    Compressed blocks of this window that the tar reader passes over on its way to a wanted one
    are kept in ``raw`` so a later request needs no second pass over the file.
    """

    def __init__(self, blocks: np.ndarray, block_rows: list[int], perm: np.ndarray, lo: int, rows: np.ndarray,
                 epoch: int):
        self.epoch = epoch
        self.blocks = [(int(s), int(b)) for s, b in blocks]
        self.members = set(self.blocks)
        self.starts = np.concatenate([[0], np.cumsum(block_rows)]).astype(np.int64)
        self.perm = perm
        self.lo = lo                  # source position of the window's first row
        self.hi = lo + len(perm)      # one past its last
        self.block_of_row = np.repeat(np.arange(len(block_rows)), block_rows)
        self.decoded = np.zeros(len(self.blocks), dtype=bool)
        self.bad = np.zeros(len(self.blocks), dtype=bool)
        self.complete = False         # every block decoded (or found bad): nothing left to read
        self.any_bad = False
        self.rows = rows
        self.raw: dict[tuple[int, int], bytes] = {}


class _Cursor:
    """Reading state of one source in one iterator: epoch layouts, the current window, open shards.

    Positions asked for only move forward, so one window and the shards it spans suffice. The
    window's buffer is reused from window to window, so decompression writes into memory that
    is already mapped.
    """

    def __init__(self, order: SourceOrder, policy: _ErrorPolicy, *, allow_pipe: bool):
        self.order = order
        self.policy = policy
        self.allow_pipe = allow_pipe
        self.manifest = order.manifest
        self.R = order.rows
        self._layouts: dict[int, _EpochLayout] = {}
        self.window: Optional[_Window] = None
        self._buffer: Optional[np.ndarray] = None
        self._readers: dict[int, ShardReader] = {}
        self._broken: dict[int, tuple[int, ShardError]] = {}  # shard -> (first unreadable block, why)
        self._reported: set[tuple[int, int]] = set()  # (shard, epoch) whose breakage was reported

    def layout(self, epoch: int) -> _EpochLayout:
        if epoch not in self._layouts:
            # A batch can straddle two epochs; older layouts are never needed again.
            self._layouts = {e: v for e, v in self._layouts.items() if e == epoch - 1}
            self._layouts[epoch] = self.order.layout(epoch)
        return self._layouts[epoch]

    def take(self, first: int, count: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Rows at source positions ``first .. first+count-1`` (and which are bad, if any)."""
        window = self.window
        if window is not None and window.lo <= first and first + count <= window.hi:
            a = first - window.lo
            return self._from_window(window, window.perm[a:a + count])
        return self.gather(np.arange(first, first + count, dtype=np.int64))

    def gather(self, positions: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Rows at ascending source ``positions``, shape [n, row_len], as a new array."""
        window = self.window
        if window is not None and window.lo <= positions[0] and positions[-1] < window.hi:
            return self._from_window(window, window.perm[positions - window.lo])
        out = np.empty((len(positions), self.manifest.row_len), dtype=self.manifest.np_dtype)
        bad = None
        i = 0
        while i < len(positions):
            window = self.window
            if window is None or not (window.lo <= positions[i] < window.hi):
                window = self.enter(int(positions[i]))
            j = int(np.searchsorted(positions, window.hi, side="left"))
            rows, bad_here = self._from_window(window, window.perm[positions[i:j] - window.lo])
            out[i:j] = rows
            if bad_here is not None:
                bad = np.zeros(len(positions), dtype=bool) if bad is None else bad
                bad[i:j] = bad_here
            i = j
        return out, bad

    def _from_window(self, window: _Window, idx: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        if not window.complete:
            self.decode_for(window, window.block_of_row[idx])
        bad = window.bad[window.block_of_row[idx]] if window.any_bad else None
        return window.rows[idx], bad  # fancy indexing copies: safe from the buffer's reuse

    def enter(self, pos: int) -> _Window:
        """Make the window holding source position ``pos`` the current one."""
        epoch, offset = divmod(pos, self.R)
        layout = self.layout(epoch)
        w = int(np.searchsorted(layout.window_start, offset, side="right")) - 1
        w_first, w_end = int(layout.window_start[w]), int(layout.window_start[w + 1])
        sb = self.order.shuffle_blocks
        blocks = layout.blocks[w * sb:(w + 1) * sb]
        rows = [self.order.split.shards[s].block_rows[b] for s, b in blocks]
        n = w_end - w_first
        self.window = None  # its rows are about to be overwritten
        if self._buffer is None or len(self._buffer) < n:
            self._buffer = None  # freed before its successor is allocated
            self._buffer = np.empty((n, self.manifest.row_len), dtype=self.manifest.np_dtype)
        perm = self.order.window_perm(epoch, w, n)
        window = _Window(blocks, rows, perm, epoch * self.R + w_first, self._buffer[:n], epoch)
        self.window = window
        spanned = {s for s, _ in window.blocks}
        for shard in [s for s in self._readers if s not in spanned]:
            self._readers.pop(shard).close()
        return window

    def decode_for(self, window: _Window, block_pos: np.ndarray) -> None:
        """Decompress the blocks in ``block_pos`` not yet decoded, in ascending order (each shard
        is read front to back)."""
        missing = block_pos[~window.decoded[block_pos]]
        if not len(missing):
            return
        for bp in np.unique(missing).tolist():
            self.decode(window, bp)
            window.decoded[bp] = True
        window.complete = bool(window.decoded.all())

    def decode(self, window: _Window, bp: int) -> None:
        shard, block = window.blocks[bp]
        out = window.rows[window.starts[bp]:window.starts[bp + 1]]
        broken = self._broken.get(shard)
        if broken is not None and block >= broken[0]:
            # Known unreadable from here: no second read. Reported once per epoch, like a reader
            # that met it first in this epoch would, so counts do not depend on the layout.
            self._mark_bad(window, bp, broken[1] if (shard, window.epoch) not in self._reported else None)
            self._reported.add((shard, window.epoch))
            return
        try:
            reader = self._reader(shard)
            data = window.raw.pop((shard, block), None)
            if data is None:

                def keep(index: int, skipped: bytes) -> None:
                    if (shard, index) in window.members:
                        window.raw[(shard, index)] = skipped

                data = reader.raw(block, on_skip=keep)
            reader.decode_into(block, data, out)
        except ShardError as error:
            reader = self._readers.pop(shard, None)
            if reader is not None:
                reader.close()
            # A network error may pass: only this block is lost, the next one tries again.
            if not error.block_local and error.kind != "unreachable":
                # The archive cannot be read past this point; earlier blocks were fine.
                at = error.block if error.block is not None and error.block <= block else block
                self._broken[shard] = (at, error)
                self._reported.add((shard, window.epoch))
            self._mark_bad(window, bp, error)

    def _mark_bad(self, window: _Window, bp: int, error: Optional[ShardError]) -> None:
        window.bad[bp] = True
        window.any_bad = True
        if error is not None:
            self.policy.bad(error, window.epoch)

    def _reader(self, shard: int) -> ShardReader:
        reader = self._readers.get(shard)
        if reader is None:
            info = self.order.split.shards[shard]
            reader = ShardReader(self.order.shard_urls[shard], dtype=self.manifest.np_dtype,
                                 row_len=self.manifest.row_len, block_rows=info.block_rows,
                                 allow_pipe=self.allow_pipe)
            self._readers[shard] = reader
        return reader

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self.window = None
        self._buffer = None


def make_loader(
    stream: TokenStream, num_workers: int, *, pin_memory: bool = False, prefetch_factor: int = 2
) -> Iterator[MicroBatch]:
    """Iterate ``stream`` in ``num_workers`` processes (0: in this process), in micro-batch order.

    Worker ``w`` produces micro-batches ``k`` with ``k % num_workers == w`` and DataLoader
    collects from workers round-robin, so batches arrive in ``k`` order, none lost or repeated.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if num_workers == 0:
        return iter(stream)
    loader = DataLoader(
        stream,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        # Without its own generator DataLoader draws the workers' base seed from the global
        # torch RNG, shifting the training process's dropout stream: resumes would not be exact.
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
        # A preemption signal is the trainer's to act on; a worker dies with its trainer.
        worker_init_fn=functools.partial(ignore_in_worker, trainer_pid=os.getpid()),
    )
    return _raise_handed_over(_start_workers(loader))


def _start_workers(loader: DataLoader) -> Iterator:
    """``iter(loader)``, which forks the workers, with SIGTERM blocked in this thread meanwhile.

    A forked worker runs torch's own SIGTERM handler (die unless the sender is the trainer)
    until its worker_init_fn replaces it: a scheduler's SIGTERM to the whole job in that window
    killed the worker and failed the loader before the trainer could save. Forked with SIGTERM
    blocked, the worker holds such a signal pending until ignore_in_worker's thread reads and
    ignores it. The trainer loses nothing: a SIGTERM for it meanwhile goes to one of its other
    threads or waits here until the mask is restored.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
