"""``distlm prepare``: turn text files and JSONL into tokenized, packed, sharded training rows.

Inputs are text files, folders of them (walked recursively in sorted order) and JSONL files
(``.jsonl``, ``.jsonl.zst``; one JSON object per line, the text under ``text_field``; blank
lines are skipped). Every file, or every JSONL record, is one document, and EOS is appended
after each document (an empty file is a document of just EOS). Files that are not valid UTF-8
are skipped with one log line each and counted in the manifest as ``skipped_files``.

The documents, in input order, form one token stream. Its last ``val_fraction`` of tokens is
the validation split (as nanoGPT holds out the tail of the text) and the rest is train. Each
split is packed into rows of ``seq_len + 1`` tokens with stride ``seq_len``: row ``i`` is
``stream[i*L : i*L + L + 1]``, so inputs ``row[:-1]`` and targets ``row[1:]`` predict every
token once. The short tail that does not fill a row is dropped and counted in the manifest.

Memory stays flat whatever the corpus size: pass 1 only counts tokens (and, for the char
tokenizer, collects the vocabulary); pass 2 encodes and writes, holding a buffer of about
one block. Text files are read in chunks, so one huge file is fine too.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from .shards import (
    FORMAT,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    VERSION,
    ShardInfo,
    ShardWriter,
    dtype_for_vocab,
    shard_file_name,
    write_manifest,
)
from .inputs import InputError, NotUtf8, find_input_files, read_documents
from .tokenizers import ByteTokenizer, CharTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_VAL_FRACTION",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_SHARD_MB",
    "BLOCK_TARGET_BYTES",
    "PrepareError",
    "find_input_files",
    "prepare_corpus",
    "rows_for_tokens",
]

DEFAULT_VAL_FRACTION = 0.01
"""1% of tokens held out: enough rows for a stable validation loss even on small corpora
(tiny Shakespeare gives ~11k tokens), cheap to evaluate on large ones."""
DEFAULT_SEQ_LEN = 1024
DEFAULT_SHARD_MB = 256.0
BLOCK_TARGET_BYTES = 1 << 20
"""Default uncompressed size of one block: the unit of decompression and of shuffling windows."""

_LEFTOVER_RE = re.compile(r"^((train|val)-\d{6}\.tar|tokenizer\.json|manifest\.json)(\.tmp)?$")

Log = Callable[[str], Any]


class PrepareError(InputError):
    """The inputs or options cannot produce a dataset; the message says what to change."""


# --------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """Logs one line every ``every_s`` seconds so a long prepare shows it is alive."""

    def __init__(self, log: Log, label: str, n_files: int, every_s: float):
        self.log, self.label, self.n_files, self.every_s = log, label, n_files, every_s
        self.start = self.last = time.monotonic()
        self.files = self.bytes = self.tokens = 0

    def update(self, *, nbytes: int = 0, tokens: int = 0, files: int = 0) -> None:
        self.bytes += nbytes
        self.tokens += tokens
        self.files += files
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.log(self.line())

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        return (
            f"{self.label}: {self.files}/{self.n_files} files, {self.bytes / 1e6:.1f} MB, "
            f"{self.tokens:,} tokens, {elapsed:.1f} s"
        )

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start


# --------------------------------------------------------------------------------------------
# Pass 1: count


@dataclass
class _Counts:
    files: list[Path] = field(default_factory=list)
    skipped_files: int = 0
    documents: int = 0
    tokens: int = 0
    bytes: int = 0
    chars: set[str] = field(default_factory=set)


def _count(files: list[Path], tok_kind: str, text_field: str, log: Log, progress_s: float) -> _Counts:
    """Pass 1: tokens per document (+1 EOS), valid files, and the characters seen (char only)."""
    counts = _Counts()
    progress = _Progress(log, "pass 1/2 (count)", len(files), progress_s)
    count_tokens = (lambda s: len(s.encode("utf-8"))) if tok_kind == "byte" else len
    for path in files:
        # Per-file tallies are merged only once the whole file decoded, so a file skipped for
        # bad UTF-8 halfway through leaves no trace in the totals.
        docs = tokens = nbytes = 0
        chars: set[str] = set()
        try:
            for piece in read_documents(path, text_field):
                n = count_tokens(piece.text) + (1 if piece.end else 0)
                tokens += n
                nbytes += piece.nbytes
                if tok_kind == "char":
                    chars.update(piece.text)
                if piece.end:
                    docs += 1
                progress.update(nbytes=piece.nbytes, tokens=n)
        except NotUtf8 as exc:
            log(f"skipping {path}: not valid UTF-8 (near byte {exc.offset}); binary file?")
            counts.skipped_files += 1
            progress.update(files=1)
            continue
        except OSError as exc:
            raise PrepareError(f"cannot read input {path}: {exc}") from exc
        counts.files.append(path)
        counts.documents += docs
        counts.tokens += tokens
        counts.bytes += nbytes
        counts.chars |= chars
        progress.update(files=1)
    log(progress.line())
    return counts


# --------------------------------------------------------------------------------------------
# Pass 2: pack and write


def rows_for_tokens(tokens: int, seq_len: int, stride: Optional[int] = None) -> int:
    """Rows of seq_len+1 tokens, one starting every ``stride`` (default seq_len) tokens."""
    stride = stride or seq_len
    return (tokens - seq_len - 1) // stride + 1 if tokens > seq_len else 0


class _SplitWriter:
    """Packs one split's token stream into rows, blocks and shards, keeping ~one block in memory."""

    def __init__(self, out_dir: Path, split: str, *, seq_len: int, block_rows: int, dtype: np.dtype,
                 shard_bytes: int, stride: Optional[int] = None):
        self.out_dir, self.split = out_dir, split
        self.seq_len, self.block_rows, self.dtype = seq_len, block_rows, dtype
        # Rows start every `stride` tokens: seq_len overlaps consecutive rows by one token (every
        # token is predicted once); less makes overlapping windows (nanoGPT's random windows).
        self.stride = stride or seq_len
        self.block_span = (block_rows - 1) * self.stride + seq_len + 1  # tokens one block covers
        self.shard_bytes = shard_bytes
        self.pending: list[np.ndarray] = []
        self.n_pending = 0
        self.tokens = 0
        self.rows = 0
        self.dropped = 0
        self.shards: list[ShardInfo] = []
        self.writer: Optional[ShardWriter] = None

    def feed(self, ids: np.ndarray) -> None:
        if not ids.size:
            return
        self.pending.append(ids.astype(self.dtype, copy=False))
        self.n_pending += ids.size
        self.tokens += ids.size
        if self.n_pending >= self.block_span:
            self._drain(final=False)

    def _drain(self, final: bool) -> None:
        buf = np.concatenate(self.pending) if len(self.pending) != 1 else self.pending[0]
        L, S, b = self.seq_len, self.stride, self.block_rows
        pos = 0
        while len(buf) - pos >= self.block_span:
            self._write_rows(buf[pos:pos + self.block_span])
            pos += b * S
        if final:
            r = rows_for_tokens(len(buf) - pos, L, S)
            if r:
                self._write_rows(buf[pos:pos + (r - 1) * S + L + 1])
                pos += r * S
            # Tokens after the last row's end are the dropped tail.
            covered = (self.rows - 1) * S + L + 1 if self.rows else 0
            self.dropped = self.tokens - covered
        # Copy so the big concatenated buffer can be freed; the tail is < one block.
        rest = buf[pos:].copy()
        self.pending = [rest]
        self.n_pending = rest.size

    def _write_rows(self, segment: np.ndarray) -> None:
        L = self.seq_len
        rows = np.lib.stride_tricks.sliding_window_view(segment, L + 1)[::self.stride]
        if self.writer is None:
            path = self.out_dir / shard_file_name(self.split, len(self.shards))
            self.writer = ShardWriter(path, dtype=self.dtype, row_len=L + 1)
        self.writer.add_block(np.ascontiguousarray(rows))
        self.rows += rows.shape[0]
        if self.writer.bytes_written >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self.writer is not None:
            self.shards.append(self.writer.close())
            self.writer = None

    def finish(self) -> dict[str, Any]:
        if self.pending:
            self._drain(final=True)
        self._close_shard()
        return {
            "rows": self.rows,
            "tokens": self.tokens,
            "dropped_tokens": self.dropped,
            "stride": self.stride,
            "shards": [s.to_dict() for s in self.shards],
        }

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


# --------------------------------------------------------------------------------------------
# Checks and the entry point


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _check_out_dir(out: Path, log: Log) -> None:
    if out.exists() and not out.is_dir():
        raise PrepareError(f"--out {out} is a file, not a folder; pick another --out")
    if (out / MANIFEST_NAME).exists():
        raise PrepareError(
            f"{out} already holds a prepared dataset ({out / MANIFEST_NAME} exists); "
            f"pick another --out or delete {out} first"
        )
    if out.is_dir():
        # No manifest means an earlier prepare stopped midway; its files are not valid data.
        leftovers = sorted(p for p in out.iterdir() if p.is_file() and _LEFTOVER_RE.match(p.name))
        for p in leftovers:
            p.unlink()
        if leftovers:
            log(f"removed {len(leftovers)} files left in {out} by an interrupted prepare")


def _resolve_tokenizer(tokenizer: Union[str, os.PathLike, Tokenizer]) -> tuple[Optional[Tokenizer], str]:
    """(tokenizer or None if it must be fitted, kind) from a spec."""
    if isinstance(tokenizer, (ByteTokenizer, CharTokenizer)):
        return tokenizer, tokenizer.name
    if os.fspath(tokenizer) == "char":
        return None, "char"
    try:
        tok = load_tokenizer(tokenizer)
    except ValueError as exc:
        raise PrepareError(str(exc)) from None
    return tok, tok.name


def _split_too_small(name: str, tokens: int, seq_len: int, total: int) -> PrepareError:
    need = seq_len + 1
    if name == "val":
        min_frac = need / total if total else float("inf")
        fix = (f"raise --val-fraction to at least {min_frac:.4g}, lower --seq-len, or use "
               f"--val-fraction 0 for no validation split")
    else:
        fix = "add more text or lower --seq-len"
    return PrepareError(
        f"the {name} split has {tokens:,} tokens but one row needs seq_len + 1 = {need:,}; {fix}"
    )


def prepare_corpus(
    inputs: Sequence[Union[str, os.PathLike]],
    out_dir: Union[str, os.PathLike],
    tokenizer: Union[str, os.PathLike, Tokenizer] = "byte",
    seq_len: int = DEFAULT_SEQ_LEN,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    shard_mb: float = DEFAULT_SHARD_MB,
    block_rows: Optional[int] = None,
    text_field: str = "text",
    log: Log = print,
    progress_s: float = 5.0,
    stride: Optional[int] = None,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into a dataset folder ``out_dir``; returns the manifest dict.

    ``tokenizer``: "byte", "char" (fitted on the inputs), or a tokenizer.json / dataset folder
    to reuse. ``val_fraction``: share of tokens, taken from the end of the stream, for the
    "val" split (0 writes no val split). ``block_rows``: rows per block, default about 1 MiB
    of ids. ``shard_mb``: a shard is closed once it reaches about this many MB. ``stride``:
    training rows start every ``stride`` tokens (default seq_len: no overlap but the one
    target token); a smaller stride writes overlapping windows, which on a small corpus stands
    in for nanoGPT's random windows. Validation rows always use seq_len.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = Path(out_dir)
    if seq_len < 1:
        raise PrepareError(f"seq_len must be >= 1, got {seq_len}")
    if not (0.0 <= val_fraction < 1.0):
        raise PrepareError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if not shard_mb > 0:
        raise PrepareError(f"shard_mb must be > 0, got {shard_mb}")
    if stride is not None and not 1 <= stride <= seq_len:
        raise PrepareError(f"stride must be between 1 and seq_len ({seq_len}), got {stride}")
    if block_rows is not None and block_rows < 1:
        raise PrepareError(f"block_rows must be >= 1, got {block_rows}")
    if not inputs:
        raise PrepareError("no inputs given; pass text files, folders or .jsonl/.jsonl.zst files")
    tok, tok_kind = _resolve_tokenizer(tokenizer)
    _check_out_dir(out, log)
    files = find_input_files(inputs, exclude=out)
    if not files:
        raise PrepareError(f"no input files found in {', '.join(map(str, inputs))} (hidden files are skipped)")

    t0 = time.monotonic()
    counts = _count(files, tok_kind, text_field, log, progress_s)
    if counts.tokens == 0:
        raise PrepareError(
            f"no text found: {counts.skipped_files} of {len(files)} input files were skipped as not UTF-8, "
            f"the rest are empty"
        )
    if tok is None:
        tok = CharTokenizer(counts.chars)
    elif isinstance(tok, CharTokenizer):
        missing = sorted(counts.chars - set(tok.chars))
        if missing:
            shown = "".join(missing[:20])
            raise PrepareError(
                f"{len(missing)} characters of the inputs are not in the given char tokenizer "
                f"(e.g. {shown!r}); use --tokenizer char to fit a new one on these inputs"
            )

    total = counts.tokens
    n_val = int(round(total * val_fraction)) if val_fraction > 0 else 0
    split_tokens = {"train": total - n_val}
    if val_fraction > 0:
        split_tokens["val"] = n_val
    for name, n in split_tokens.items():
        if rows_for_tokens(n, seq_len) < 1:
            raise _split_too_small(name, n, seq_len, total)

    dtype = dtype_for_vocab(tok.vocab_size)
    row_len = seq_len + 1
    if block_rows is None:
        block_rows = max(1, BLOCK_TARGET_BYTES // (row_len * dtype.itemsize))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out / TOKENIZER_NAME)

    shard_bytes = max(1, int(shard_mb * (1 << 20)))
    writers = {
        name: _SplitWriter(out, name, seq_len=seq_len, block_rows=block_rows, dtype=dtype,
                           shard_bytes=shard_bytes, stride=stride if name == "train" else None)
        for name in split_tokens
    }
    n_train = split_tokens["train"]
    eos = np.array([tok.eos_id], dtype=np.uint32)
    progress = _Progress(log, "pass 2/2 (write)", len(counts.files), progress_s)
    position = 0  # tokens of the stream routed so far

    def route(ids: np.ndarray) -> None:
        nonlocal position
        cut = min(max(n_train - position, 0), ids.size)
        if cut:
            writers["train"].feed(ids[:cut])
        if cut < ids.size:
            writers["val"].feed(ids[cut:])
        position += ids.size

    try:
        for path in counts.files:
            try:
                for piece in read_documents(path, text_field):
                    ids = tok.encode(piece.text)
                    route(ids)
                    if piece.end:
                        route(eos)
                    progress.update(nbytes=piece.nbytes, tokens=ids.size + piece.end)
            except NotUtf8:
                raise PrepareError(
                    f"{path} changed during prepare (it is no longer valid UTF-8); run prepare again"
                ) from None
            except OSError as exc:
                raise PrepareError(f"cannot read input {path}: {exc}") from exc
            progress.update(files=1)
        if position != total:
            raise PrepareError(
                f"the inputs changed during prepare ({total:,} tokens counted, {position:,} read); "
                f"run prepare again on inputs that are not being written to"
            )
        splits = {name: w.finish() for name, w in writers.items()}
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    log(progress.line())

    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "seq_len": seq_len,
        "row_len": row_len,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "tokenizer": tok.to_dict(),
        "tokenizer_file": TOKENIZER_NAME,
        "splits": splits,
        "source": {
            "inputs": [os.fspath(p) for p in inputs],
            "files": len(counts.files),
            "documents": counts.documents,
            "tokens": total,
            "skipped_files": counts.skipped_files,
        },
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    # Written last: a folder with a manifest is complete, one without it is not a dataset.
    write_manifest(out, manifest)

    elapsed = time.monotonic() - t0
    per_split = "; ".join(
        f"{name}: {_n(s['rows'], 'row')}, {_n(s['tokens'], 'token')} ({s['dropped_tokens']:,} dropped), "
        f"{_n(len(s['shards']), 'shard')}"
        for name, s in splits.items()
    )
    mb = counts.bytes / 1e6
    log(
        f"prepared {out}: {per_split}; {_n(counts.documents, 'document')} from {_n(len(counts.files), 'file')} "
        f"({counts.skipped_files} skipped); {tok.name} tokenizer, vocab {tok.vocab_size}; "
        f"{mb:.1f} MB in {elapsed:.1f} s ({mb / max(elapsed, 1e-9):.1f} MB/s)"
    )
    return manifest
