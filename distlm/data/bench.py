"""``distlm data bench DIR``: how close the training read path comes to bare zstd decoding.

Both figures are measured in one process on the same shards and in the same unit, tokens of
stored rows (``seq_len + 1`` per row) per second:

* ``loader_tokens_per_s``: :class:`~distlm.data.stream.TokenStream` with shuffling on, iterated
  directly (no loader workers), as training reads it: tar iteration, decompression, the
  shuffled gather and the conversion to LongTensors. The first micro-batch (start-up) is not
  timed; at least one whole shuffling window is read. Rows are produced as training takes them: one int64 copy per
  micro-batch, inputs and targets views of it.
* ``zstd_tokens_per_s``: ``zstandard.ZstdDecompressor().decompress`` alone over every block's
  compressed bytes, read into memory beforehand (on a split over 512 MiB compressed, only its
  first blocks up to that size).

The two alternate in slices of about half a second until each has run ``seconds``, so a machine
whose speed drifts affects both alike. ``ratio = loader / zstd``: the share of the decoder's
speed the read path keeps. Decoding is part of both, so the ratio cannot exceed about 1.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Iterator

import zstandard as zstd

from .shards import ShardReader
from .stream import TokenStream

__all__ = ["bench_dataset"]

_SLICE_S = 0.5
_MAX_RAW_BYTES = 512 << 20


def _raw_blocks(stream: TokenStream, max_bytes: int) -> list[bytes]:
    """The compressed bytes of the split's blocks in manifest order, until ``max_bytes`` are read."""
    manifest = stream.manifest
    frames: list[bytes] = []
    size = 0
    for shard in stream.split.shards:
        with ShardReader(manifest.shard_url(shard), dtype=manifest.np_dtype, row_len=manifest.row_len,
                         block_rows=shard.block_rows) as reader:
            for i in range(len(shard.block_rows)):
                frames.append(reader.raw(i))
                size += len(frames[-1])
                if size >= max_bytes:
                    return frames
    return frames


class _Meter:
    """What one side of the comparison did over all its slices: items, tokens and seconds."""

    def __init__(self) -> None:
        self.count = 0
        self.tokens = 0
        self.seconds = 0.0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def _run_loader(batches: Iterator[Any], tokens_per_batch: int, meter: _Meter, seconds: float,
                at_least: int = 1) -> None:
    """Take micro-batches for ``seconds``, and at least ``at_least`` of them."""
    n = 0
    start = time.perf_counter()
    while True:
        next(batches)
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds and n >= at_least:
            break
    meter.count += n
    meter.tokens += n * tokens_per_batch
    meter.seconds += elapsed


def _run_zstd(frames: list[bytes], itemsize: int, meter: _Meter, seconds: float) -> None:
    """Decompress frames for ``seconds``, cycling through them from where the last slice stopped."""
    i, tokens = meter.count, 0
    start = time.perf_counter()
    while True:
        tokens += len(zstd.ZstdDecompressor().decompress(frames[i % len(frames)])) // itemsize
        i += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            break
    meter.count = i
    meter.tokens += tokens
    meter.seconds += elapsed


def bench_dataset(
    data_dir: str | os.PathLike,
    split: str = "train",
    *,
    micro_batch_size: int = 8,
    seconds: float = 5.0,
    log: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Measure the read path against bare zstd decoding; see the module docstring.

    Logs a header and, as the last line, ``loader_tokens_per_s=N zstd_tokens_per_s=N ratio=R``.
    Raises :class:`~distlm.data.shards.ShardError` for a missing or damaged shard.
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    stream = TokenStream(data_dir, split, micro_batch_size=micro_batch_size, shuffle=True)
    manifest, info = stream.manifest, stream.split
    log(
        f"dataset {manifest.location} split {split}: {info.rows:,} rows, {info.blocks:,} blocks in "
        f"{len(info.shards)} shard(s), seq_len {manifest.seq_len}, {manifest.dtype}; "
        f"micro_batch_size {micro_batch_size}, ~{seconds:g} s per measurement"
    )
    frames = _raw_blocks(stream, _MAX_RAW_BYTES)
    itemsize = manifest.np_dtype.itemsize
    compressed = sum(len(f) for f in frames)
    tokens_per_batch = micro_batch_size * manifest.row_len
    # At least the rows of the first shuffling window, so each of its blocks is decoded once.
    min_batches = -(-int(stream.orders[0].layout(0).window_start[1]) // micro_batch_size)
    # The two sides alternate in short slices, so a machine whose speed drifts (turbo, noisy
    # neighbours) slows both alike instead of skewing the ratio.
    slices = max(1, round(seconds / _SLICE_S))
    loader, bare = _Meter(), _Meter()
    batches = iter(stream)
    try:
        next(batches)  # start-up, not timed: opening the shard, the epoch layout, the first decodes
        for _ in range(slices):
            _run_loader(batches, tokens_per_batch, loader, seconds / slices)
            _run_zstd(frames, itemsize, bare, seconds / slices)
        if loader.count < min_batches:
            _run_loader(batches, tokens_per_batch, loader, 0.0, at_least=min_batches - loader.count)
    finally:
        batches.close()  # type: ignore[attr-defined]
    log(f"loader: {loader.count:,} micro-batches in {loader.seconds:.2f} s")
    log(f"zstd: {bare.count:,} frames in {bare.seconds:.2f} s, cycling over {len(frames):,} of "
        f"{info.blocks:,} blocks ({compressed / 2**20:.1f} MiB compressed)")
    zstd_rate = bare.rate
    loader_rate = loader.rate
    ratio = loader_rate / zstd_rate
    log(f"loader_tokens_per_s={loader_rate:.0f} zstd_tokens_per_s={zstd_rate:.0f} ratio={ratio:.3f}")
    return {
        "dataset": manifest.location,
        "split": split,
        "rows": info.rows,
        "blocks": info.blocks,
        "seq_len": manifest.seq_len,
        "micro_batch_size": micro_batch_size,
        "loader_tokens_per_s": loader_rate,
        "zstd_tokens_per_s": zstd_rate,
        "ratio": ratio,
    }
