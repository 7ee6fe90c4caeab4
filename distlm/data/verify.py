"""``distlm data verify DIR``: check every shard of a prepared dataset against its manifest.

Each shard must exist, have the manifest's size and sha256, and hold exactly the listed
blocks, each a zstd frame whose checksum holds and whose row count matches. A damaged shard
is named with what is wrong and what to do; nothing is repaired or skipped silently.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Callable

from .shards import Manifest, ShardError, ShardInfo, ShardReader, load_manifest

_HASH_CHUNK = 1 << 20


@dataclass
class ShardProblem:
    split: str
    path: str
    problem: str


def _sha256(path: os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def check_shard(manifest: Manifest, shard: ShardInfo) -> str | None:
    """What is wrong with one shard, or None when it matches the manifest."""
    path = manifest.shard_path(shard)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != shard.bytes:
        return f"size {size:,} bytes, manifest says {shard.bytes:,} (truncated or replaced)"
    digest = _sha256(path)
    if digest != shard.sha256:
        return f"sha256 {digest[:16]}..., manifest says {shard.sha256[:16]}... (content changed)"
    # The hash can only match a damaged file if the manifest was rewritten to fit it; decoding
    # every block still proves the frames and row counts.
    try:
        with ShardReader(path, dtype=manifest.np_dtype, row_len=manifest.row_len,
                         block_rows=shard.block_rows) as reader:
            for index in range(len(shard.block_rows)):
                reader.read(index)
    except ShardError as e:
        return str(e)
    return None


def verify_dataset(data_dir: str | os.PathLike, log: Callable[[str], None] = print) -> list[ShardProblem]:
    """Check every shard; log one line per shard; return the problems found (empty: all good)."""
    manifest = load_manifest(data_dir)
    problems = []
    for split_name, split in sorted(manifest.splits.items()):
        for shard in split.shards:
            problem = check_shard(manifest, shard)
            if problem is None:
                log(f"ok   {split_name:5s} {shard.path} ({shard.rows:,} rows)")
            else:
                problems.append(ShardProblem(split_name, shard.path, problem))
                log(f"BAD  {split_name:5s} {shard.path}: {problem}")
    n = sum(len(s.shards) for s in manifest.splits.values())
    if problems:
        log(f"{len(problems)} of {n} shards in {manifest.path} do not match the manifest; "
            f"re-copy them or re-run `distlm prepare`")
    else:
        log(f"all {n} shards in {manifest.path} match the manifest")
    return problems
