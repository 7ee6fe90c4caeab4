"""``distlm data verify DIR``: check every shard of a prepared dataset against its manifest.

Each shard must exist, have the manifest's size and sha256, and hold exactly the listed
blocks, each a zstd frame whose checksum holds and whose row count matches. A damaged shard
is named with the kind of fault (see :data:`~distlm.data.shards.ERROR_KINDS`), what is wrong
and what to do; nothing is repaired or skipped silently.

Why both a hash and a full decode: the hash catches any change, including a cut in the
archive's trailing padding that no reader would notice, but says nothing about *what* broke;
decoding every block classifies the fault and still catches damage when the manifest itself
was rewritten to match a damaged file. Both come from one pass over the bytes.
``DIR`` may also be a dataset URL (``http(s)://host/ds``).
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from typing import BinaryIO, Callable, Optional

from .shards import Manifest, ShardError, ShardInfo, ShardReader, load_manifest

_HASH_CHUNK = 1 << 20
_MAX_LISTED_BLOCKS = 3


@dataclass
class ShardProblem:
    split: str
    path: str
    problem: str
    kind: str = "checksum"


class _HashingStream:
    """A read-only stream wrapper that hashes and counts every byte read through it."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(_HASH_CHUNK):
            pass

    def close(self) -> None:
        self._f.close()


class _HashingShardReader(ShardReader):
    """A ShardReader whose stream is hashed as it is read, so verifying costs one pass."""

    stream: Optional[_HashingStream] = None

    def _open_stream(self) -> BinaryIO:
        self.stream = _HashingStream(super()._open_stream())
        return self.stream  # type: ignore[return-value]


def _hash_url(url: str, allow_pipe: bool) -> tuple[int, str]:
    from .remote import open_url

    with open_url(url, allow_pipe=allow_pipe) as f:
        stream = _HashingStream(f)
        stream.drain()
    return stream.bytes, stream.sha256.hexdigest()


def check_shard(manifest: Manifest, shard: ShardInfo, *, allow_pipe: bool = False) -> Optional[ShardError]:
    """What is wrong with one shard, or None when it matches the manifest.

    The error's ``kind`` is the first structural fault found (``truncated``, ``short``, ...),
    or ``checksum`` when every block reads but the size or sha256 differs; its message lists
    every fault found, the size and hash mismatch included.
    """
    url = manifest.shard_url(shard)
    faults: list[ShardError] = []
    size = digest = None
    with _HashingShardReader(url, dtype=manifest.np_dtype, row_len=manifest.row_len,
                             block_rows=shard.block_rows, allow_pipe=allow_pipe) as reader:
        try:
            for index in range(len(shard.block_rows)):
                data = reader.raw(index)
                try:
                    reader.decode(index, data)
                except ShardError as e:  # block-local: the blocks after it can still be checked
                    faults.append(e)
            reader.expect_end()
            assert reader.stream is not None
            reader.stream.drain()
            size, digest = reader.stream.bytes, reader.stream.sha256.hexdigest()
        except ShardError as e:
            faults.append(e)
    if size is None and not any(f.kind in ("missing", "unreachable") for f in faults):
        try:  # the archive could not be read to its end: hash the bytes on their own
            size, digest = _hash_url(url, allow_pipe)
        except ShardError as e:
            faults.append(e)
    parts = [str(f) for f in faults[:_MAX_LISTED_BLOCKS]]
    if len(faults) > _MAX_LISTED_BLOCKS:
        parts.append(f"{len(faults) - _MAX_LISTED_BLOCKS} more bad blocks")
    if size is not None and size != shard.bytes:
        parts.append(f"size {size:,} bytes, manifest says {shard.bytes:,} (truncated or replaced)")
    elif digest is not None and digest != shard.sha256:
        parts.append(f"sha256 {digest[:16]}..., manifest says {shard.sha256[:16]}... (content changed)")
    if not parts:
        return None
    kind = faults[0].kind if faults else "checksum"
    block = faults[0].block if faults else None
    return ShardError("; ".join(parts), kind=kind, url=url, block=block)


def verify_dataset(data_dir: str | os.PathLike, log: Callable[[str], None] = print, *,
                   allow_pipe: bool = False) -> list[ShardProblem]:
    """Check every shard; log one line per shard; return the problems found (empty: all good)."""
    manifest = load_manifest(data_dir, allow_pipe=allow_pipe)
    problems = []
    for split_name, split in sorted(manifest.splits.items()):
        for shard in split.shards:
            error = check_shard(manifest, shard, allow_pipe=allow_pipe)
            if error is None:
                log(f"ok   {split_name:5s} {shard.path} ({shard.rows:,} rows)")
            else:
                problems.append(ShardProblem(split_name, shard.path, str(error), error.kind))
                log(f"BAD  {split_name:5s} {shard.path} [{error.kind}]: {error}")
    n = sum(len(s.shards) for s in manifest.splits.values())
    if problems:
        kinds = ", ".join(f"{kind}: {count}" for kind, count in sorted(Counter(p.kind for p in problems).items()))
        log(f"{len(problems)} of {n} shards in {manifest.location} do not match the manifest ({kinds}); "
            f"re-copy them or re-run `distlm prepare`")
    else:
        log(f"all {n} shards in {manifest.location} match the manifest")
    return problems
