"""Synthetic training data in distlm's prepared-shard format: uniformly random token ids.

Throughput does not depend on what the tokens say, and no tokenizer with a 32k vocabulary has
to travel to a machine without network. The folder is what ``distlm prepare`` would write for a
train split only (so ``distlm train`` skips evaluation): one WebDataset tar of zstd blocks of
``[rows, seq_len + 1]`` ids, and a manifest whose tokenizer entry names a synthetic tokenizer of
``vocab_size`` ids (training reads only ``vocab_size`` from it; nothing here decodes text).
The plain loop reads the same ids, un-overlapped back into one array (``tokens.npy``).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np


def random_stream(vocab_size: int, n: int, seed: int) -> np.ndarray:
    """``n`` ids drawn uniformly from ``0 .. vocab_size - 2`` (the last id is the nominal EOS)."""
    return np.random.default_rng(seed).integers(0, vocab_size - 1, size=n, dtype=np.int64)


def learnable_stream(vocab_size: int, n: int, seed: int, symbols: int = 64, noise: float = 0.1) -> np.ndarray:
    """``n`` ids from a Markov chain a model learns within a few steps: only ``symbols`` of the
    vocabulary's ids occur (the unigram alone drops the loss from ln(vocab) towards
    ln(symbols)), and each one is followed by a fixed successor except with probability ``noise``.

    For the precision check: a loss that moves a lot in 8 steps tests the update path (master
    weights, gradients, optimizer), not only the forward pass.
    """
    rng = np.random.default_rng(seed)
    ids = rng.choice(vocab_size - 1, size=min(symbols, vocab_size - 1), replace=False)
    successor = rng.permutation(len(ids))
    state = np.empty(n, dtype=np.int64)
    jumps = rng.random(n) < noise
    targets = rng.integers(0, len(ids), size=n)
    current = 0
    for i in range(n):
        current = targets[i] if jumps[i] else successor[current]
        state[i] = current
    return ids[state]


def write_random_dataset(out: str | Path, *, vocab_size: int, seq_len: int, rows: int, seed: int = 0,
                         block_rows: int = 64, learnable: bool = False) -> Path:
    """Write ``rows`` rows of ``seq_len + 1`` ids below ``vocab_size`` to ``out``; return ``out``.

    The ids are uniformly random, or with ``learnable`` a :func:`learnable_stream`. Row ``i``
    is ``stream[i*seq_len : i*seq_len + seq_len + 1]`` of one stream, as ``distlm prepare``
    packs rows (consecutive rows share one token). ``out/tokens.npy`` holds that stream, for
    ``benchmarks/plain_loop.py --tokens``.
    """
    from distlm.data.shards import FORMAT, VERSION, ShardWriter, dtype_for_vocab, shard_file_name, write_manifest

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = dtype_for_vocab(vocab_size)
    # One EOS-free stream; the last id is the tokenizer's nominal EOS and never drawn, as
    # no text ever encodes to EOS in a real prepare.
    make = learnable_stream if learnable else random_stream
    stream = make(vocab_size, rows * seq_len + 1, seed).astype(dtype)
    row_len = seq_len + 1
    index = np.arange(rows)[:, None] * seq_len + np.arange(row_len)[None, :]
    table = stream[index]
    with ShardWriter(out / shard_file_name("train", 0), dtype=dtype, row_len=row_len) as writer:
        for start in range(0, rows, block_rows):
            writer.add_block(table[start:start + block_rows])
        info = writer.close()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "seq_len": seq_len,
        "row_len": row_len,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "tokenizer": {"name": "synthetic-random", "vocab_size": vocab_size, "eos_id": vocab_size - 1},
        "tokenizer_file": "tokenizer.json",
        "documents": "eos",
        "add_bos": False,
        "splits": {"train": {"rows": rows, "tokens": rows * seq_len + 1, "dropped_tokens": 0,
                             "stride": seq_len, "shards": [info.to_dict()]}},
        "source": {"inputs": ["<synthetic learnable ids>" if learnable else "<synthetic random ids>"],
                   "files": 0, "documents": 0,
                   "tokens": rows * seq_len + 1, "skipped_files": 0},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_manifest(out, manifest)
    np.save(out / "tokens.npy", stream)
    return out
