"""Deterministic, resumable, data-parallel micro-batches from a prepared dataset.

The *global* sample order is a pure function of ``(seed, epoch, position)``; it does not
depend on how many ranks or loader workers read it:

* Epoch ``e`` (shuffle on): the shard order is permuted by a Generator seeded from
  ``(seed, e)``; blocks keep their order inside a shard. The resulting block sequence is cut
  into windows of ``shuffle_blocks`` consecutive blocks, and the rows of window ``w`` are
  permuted by a Generator seeded from ``(seed, e, w)``. Shuffle off: natural order.
* Global position ``p`` is row ``p % R`` of that order in epoch ``p // R`` (R rows per split);
  the stream never ends.
* Global micro-batch ``k`` is positions ``[start_row + k*G, start_row + (k+1)*G)`` with
  ``G = micro_batch_size * dp_size``; rank ``r`` takes the ``r``-th slice of ``micro_batch_size``.

So a run resumed with ``start_row`` = rows already consumed continues exactly where it stopped,
even with another ``dp_size``. Windowed shuffling keeps reads sequential: a reader decompresses
each block it needs from a window once, and skips (without decompressing) blocks, windows and
whole shards that hold none of its positions, finding them from the manifest's row counts.

Shards are read one file at a time with webdataset's tar iterator, so webdataset itself never
splits shards by node or worker; the rank and worker split above is the only one.
Loader workers (:func:`make_loader`) take every ``num_workers``-th micro-batch of the rank.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import Manifest, ShardError, ShardReader, load_manifest

__all__ = ["TokenStream", "make_loader"]

# Domain tags keep the two kinds of Generator seeds apart: numpy's SeedSequence pads short
# entropy with zeros, so (seed, e) and (seed, e, 0) would otherwise give the same stream.
_SHARD_ORDER_TAG = 0
_WINDOW_ORDER_TAG = 1


@dataclass
class _EpochLayout:
    """Where the rows of one epoch come from, before the within-window permutation."""

    blocks: np.ndarray        # [n_blocks, 2]: (shard index, block index in shard), epoch order
    block_start: np.ndarray   # [n_blocks + 1]: first epoch offset of each block
    window_start: np.ndarray  # [n_windows + 1]: first epoch offset of each window


class TokenStream(IterableDataset):
    """Infinite ``(x, y)`` LongTensor micro-batches ``[micro_batch_size, seq_len]`` for one rank.

    ``x = row[:seq_len]``, ``y = row[1:seq_len + 1]``. ``seq_len=None`` uses the manifest's;
    a smaller one truncates rows. See the module docstring for the order of samples.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
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
        self.manifest: Manifest = load_manifest(data_dir)
        self.split_name = split
        self.split = self.manifest.split(split)
        if seq_len is None:
            seq_len = self.manifest.seq_len
        if not (1 <= seq_len <= self.manifest.seq_len):
            raise ValueError(
                f"seq_len {seq_len} is not in 1..{self.manifest.seq_len}: rows of {self.manifest.path} hold "
                f"{self.manifest.seq_len} + 1 tokens; re-run `distlm prepare --seq-len {seq_len}` for longer rows"
            )
        if self.split.rows < 1:
            raise ValueError(f"split {split!r} of {self.manifest.path} has no rows; re-run `distlm prepare`")
        for shard in self.split.shards:
            path = self.manifest.shard_path(shard)
            if not path.is_file():
                raise ShardError(
                    f"shard {path} listed in {self.manifest.path / 'manifest.json'} is missing; the dataset "
                    f"folder is incomplete: re-copy it or re-run `distlm prepare`"
                )
        self.micro_batch_size = micro_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.shuffle, self.shuffle_blocks = seed, shuffle, shuffle_blocks
        self.start_row = start_row
        self.seq_len = seq_len
        # Natural (manifest order) row index of each block's first row, per shard, for row_order().
        rows_before = np.cumsum([0] + [s.rows for s in self.split.shards])
        self._natural_block_start = [
            rows_before[i] + np.concatenate([[0], np.cumsum(s.block_rows)]) for i, s in enumerate(self.split.shards)
        ]

    # ---- the order ------------------------------------------------------------------------

    @property
    def rows_per_epoch(self) -> int:
        return self.split.rows

    @property
    def global_batch_size(self) -> int:
        """Rows consumed by all ranks per micro-batch step: ``micro_batch_size * dp_size``."""
        return self.micro_batch_size * self.dp_size

    def _shard_order(self, epoch: int) -> np.ndarray:
        n = len(self.split.shards)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, _SHARD_ORDER_TAG, epoch]).permutation(n)

    def _window_perm(self, epoch: int, window: int, n_rows: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n_rows)
        return np.random.default_rng([self.seed, _WINDOW_ORDER_TAG, epoch, window]).permutation(n_rows)

    def _layout(self, epoch: int) -> _EpochLayout:
        blocks, rows = [], []
        for s in self._shard_order(epoch):
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
        layout = self._layout(epoch)
        out = []
        for w in range(len(layout.window_start) - 1):
            natural = []
            for b in range(w * self.shuffle_blocks, min((w + 1) * self.shuffle_blocks, len(layout.blocks))):
                s, i = layout.blocks[b]
                natural.append(np.arange(self._natural_block_start[s][i], self._natural_block_start[s][i + 1]))
            natural_arr = np.concatenate(natural)
            out.append(natural_arr[self._window_perm(epoch, w, len(natural_arr))])
        return np.concatenate(out)

    # ---- reading --------------------------------------------------------------------------

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        cursor = _Cursor(self)
        m, seq_len = self.micro_batch_size, self.seq_len
        # Micro-batch k = worker, worker + n_workers, ...: its first position, then the stride.
        first = self.start_row + worker * self.global_batch_size + self.dp_rank * m
        step = n_workers * self.global_batch_size
        try:
            while True:
                # The casts copy, so no tensor shares memory with the reused window buffer.
                rows = cursor.rows(first, m)
                x = torch.from_numpy(rows[:, :seq_len].astype(np.int64))
                y = torch.from_numpy(rows[:, 1 : seq_len + 1].astype(np.int64))
                yield x, y
                first += step
        finally:
            cursor.close()

    def __repr__(self) -> str:
        return (
            f"TokenStream({str(self.manifest.path)!r}, split={self.split_name!r}, "
            f"micro_batch_size={self.micro_batch_size}, dp_rank={self.dp_rank}, dp_size={self.dp_size}, "
            f"seed={self.seed}, shuffle={self.shuffle}, shuffle_blocks={self.shuffle_blocks}, "
            f"start_row={self.start_row}, seq_len={self.seq_len})"
        )


class _Window:
    """One shuffling window of an epoch: its blocks, their row offsets and its row permutation.

    The window's rows, numbered in block order (block ``bp`` holds ``starts[bp]:starts[bp+1]``),
    are read in the order ``perm``: position ``j`` of the window is row ``perm[j]``. ``rows``
    holds them already in that order (``rows[j]`` is row ``perm[j]``), so the rows of consecutive
    positions are a slice. Blocks are decompressed lazily, only when a wanted row lies in them,
    each once, and scattered to their positions. Compressed blocks of this window that the tar
    reader passes over on its way to a wanted one are kept in ``raw`` so a later request needs
    no second pass over the file.
    """

    def __init__(
        self, blocks: np.ndarray, block_rows: list[int], perm: np.ndarray, lo: int, rows: np.ndarray
    ):
        self.blocks = [(int(s), int(b)) for s, b in blocks]
        self.members = set(self.blocks)
        self.starts = np.concatenate([[0], np.cumsum(block_rows)]).astype(np.int64)
        self.perm = perm
        self.lo = lo                  # global position of the window's first row
        self.hi = lo + len(perm)      # one past its last
        self.block_of = np.searchsorted(self.starts, perm, side="right") - 1  # block of position j
        self.position = np.empty_like(perm)  # position of each row: the inverse of perm
        self.position[perm] = np.arange(len(perm))
        self.decoded = np.zeros(len(self.blocks), dtype=bool)
        self.complete = False         # every block decoded: nothing left to check
        self.rows = rows
        self.raw: dict[tuple[int, int], bytes] = {}


class _Cursor:
    """Reading state of one iterator: epoch layouts, the current window and open shards.

    Positions asked for only move forward, so one window and the shards it spans suffice. The
    window's rows live in one buffer, in reading order, reused from window to window: a
    micro-batch inside a window is a slice of it. Each decoded block is copied there and freed
    at once, so the next decode reuses its memory; keeping the decoded blocks for the whole
    window instead makes every decode fault in fresh pages, which costs more than the copy.
    """

    def __init__(self, stream: TokenStream):
        self.s = stream
        self.manifest = stream.manifest
        self.R = stream.rows_per_epoch
        self._layouts: dict[int, _EpochLayout] = {}
        self.window: Optional[_Window] = None
        self._buffer: Optional[np.ndarray] = None
        self._readers: dict[int, ShardReader] = {}

    def layout(self, epoch: int) -> _EpochLayout:
        if epoch not in self._layouts:
            # A batch can straddle two epochs; older layouts are never needed again.
            self._layouts = {e: v for e, v in self._layouts.items() if e == epoch - 1}
            self._layouts[epoch] = self.s._layout(epoch)
        return self._layouts[epoch]

    def rows(self, first: int, count: int) -> np.ndarray:
        """Rows at global positions ``first .. first+count-1``, shape [count, row_len].

        Most micro-batches lie in the current window: then the result is a view of the window
        buffer, valid until the next call (the caller copies what it keeps).
        """
        window = self.window
        if window is not None and window.lo <= first and first + count <= window.hi:
            a = first - window.lo
            if not window.complete:
                self.decode_for(window, window.block_of[a : a + count])
            return window.rows[a : a + count]
        out = np.empty((count, self.manifest.row_len), dtype=self.manifest.np_dtype)
        i = 0
        while i < count:
            pos = first + i
            window = self.window
            if window is None or not (window.lo <= pos < window.hi):
                window = self.enter(pos)
            a = pos - window.lo
            n = min(count - i, window.hi - pos)
            if not window.complete:
                self.decode_for(window, window.block_of[a : a + n])
            out[i : i + n] = window.rows[a : a + n]
            i += n
        return out

    def enter(self, pos: int) -> _Window:
        """Make the window holding global position ``pos`` the current one."""
        epoch, offset = divmod(pos, self.R)
        layout = self.layout(epoch)
        w = int(np.searchsorted(layout.window_start, offset, side="right")) - 1
        w_first, w_end = int(layout.window_start[w]), int(layout.window_start[w + 1])
        sb = self.s.shuffle_blocks
        blocks = layout.blocks[w * sb : (w + 1) * sb]
        rows = [self.s.split.shards[s].block_rows[b] for s, b in blocks]
        n = w_end - w_first
        self.window = None  # its rows are about to be overwritten
        if self._buffer is None or len(self._buffer) < n:
            self._buffer = None  # freed before its successor is allocated
            self._buffer = np.empty((n, self.manifest.row_len), dtype=self.manifest.np_dtype)
        perm = self.s._window_perm(epoch, w, n)
        window = _Window(blocks, rows, perm, epoch * self.R + w_first, self._buffer[:n])
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
            window.rows[window.position[window.starts[bp] : window.starts[bp + 1]]] = self.decode(window, bp)
            window.decoded[bp] = True
        window.complete = bool(window.decoded.all())

    def decode(self, window: _Window, bp: int) -> np.ndarray:
        shard, block = window.blocks[bp]
        reader = self._readers.get(shard)
        if reader is None:
            info = self.s.split.shards[shard]
            reader = ShardReader(
                self.manifest.shard_path(info),
                dtype=self.manifest.np_dtype,
                row_len=self.manifest.row_len,
                block_rows=info.block_rows,
            )
            self._readers[shard] = reader
        data = window.raw.pop((shard, block), None)
        if data is None:

            def keep(index: int, skipped: bytes) -> None:
                if (shard, index) in window.members:
                    window.raw[(shard, index)] = skipped

            data = reader.raw(block, on_skip=keep)
        return reader.decode(block, data)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()
        self.window = None
        self._buffer = None


def make_loader(
    stream: TokenStream, num_workers: int, *, pin_memory: bool = False, prefetch_factor: int = 2
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
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
    )
    return iter(loader)
