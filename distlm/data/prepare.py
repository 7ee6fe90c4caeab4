"""``distlm prepare``: turn text files and JSONL into tokenized, packed, sharded training rows.

Inputs are text files, folders of them (walked recursively in sorted order), JSONL files
(``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``; one JSON object per line, the text under
``text_field``; blank lines are skipped) and gzipped text (any other ``.gz``). Every file, or
every JSONL record, is one document. Files that are not valid UTF-8 are skipped with one log
line each and counted in the manifest as ``skipped_files``.

Document boundaries: EOS is appended after every document (an empty file is a document of just
EOS) and no tokenizer produces EOS from text, so the EOS positions in the rows are exactly the
document ends; attention can be masked within documents from the rows alone. The manifest says
so with ``"documents": "eos"`` and counts each split's ``documents`` (its EOS tokens). With
``add_bos`` each document also starts with the tokenizer's BOS.

The documents, in input order, form one token stream. Its last ``val_fraction`` of tokens is
the validation split (as nanoGPT holds out the tail of the text) and the rest is train. Each
split is packed into rows of ``seq_len + 1`` tokens with stride ``seq_len``: row ``i`` is
``stream[i*L : i*L + L + 1]``, so inputs ``row[:-1]`` and targets ``row[1:]`` predict every
token once. The short tail that does not fill a row is dropped and counted in the manifest.

How it scales. The main process reads the inputs sequentially (decompressing, cutting whole
JSONL lines or text pieces) and hands batches of about ``batch_mb`` of raw bytes to ``workers``
worker processes, which parse JSON, tokenize and write each batch's ids to a spill file in
``OUT/.prepare/``. Since the validation split is the stream's tail, its start is only known once
everything is tokenized; rows are then cut from the spill files and compressed into blocks by
the workers, and the main process writes them to shards in order. At most two jobs per worker
are in flight, so memory stays flat whatever the corpus size. The output depends on neither the
number of workers nor the batch size.

Resuming. ``OUT/.prepare/state.json`` records what is being prepared (options, tokenizer,
every input's path, size and mtime) and ``progress.json`` how far it got (rewritten atomically
after every batch and every shard). Run with the same command, an interrupted prepare (Ctrl-C,
a crash, SIGKILL) continues from the last finished batch or shard and writes the same bytes as
an uninterrupted run; a run whose inputs or options differ is refused, naming the change
(``restart`` discards the partial work). The work folder goes once the manifest is written.

Called from a script, guard the call with ``if __name__ == "__main__":``: the workers import
the main module (they are started as by multiprocessing's "forkserver").
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import re
import shutil
import signal
import sys
import threading
import time
from bisect import bisect_right
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from functools import partial
from itertools import accumulate, chain, islice
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from distlm.fsutil import atomic_write_text

from .inputs import READ_CHUNK, InputError, NotUtf8, Piece, Segment, find_input_files, input_kind, iter_segments, \
    segment_documents
from .shards import (
    FORMAT,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    VERSION,
    ShardWriter,
    dtype_for_vocab,
    encode_block,
    shard_file_name,
    write_manifest,
)
from .tokenizers import CharTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_VAL_FRACTION",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_SHARD_MB",
    "DEFAULT_BATCH_MB",
    "BLOCK_TARGET_BYTES",
    "WORK_DIR",
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
DEFAULT_BATCH_MB = 8.0
"""Raw input bytes per tokenizing job: large enough that handing it to a worker costs little,
small enough that 2 jobs per worker in flight keep memory flat."""
BLOCK_TARGET_BYTES = 1 << 20
"""Default uncompressed size of one block: the unit of decompression and of shuffling windows."""
WORK_DIR = ".prepare"
"""Folder under ``--out`` for the spill files and the resume state; removed when done."""
STATE_FORMAT = "distlm.prepare-state"
STATE_VERSION = 1

_LEFTOVER_RE = re.compile(r"^((train|val)-\d{6}\.tar|tokenizer\.json|manifest\.json)(\.tmp)?$")

Log = Callable[[str], Any]
Cursor = tuple[int, int, int]
"""Where reading the inputs continues: (file index, offset in its decompressed bytes, line number)."""


class PrepareError(InputError):
    """The inputs or options cannot produce a dataset; the message says what to change."""


def rows_for_tokens(tokens: int, seq_len: int, stride: Optional[int] = None) -> int:
    """Rows of seq_len+1 tokens, one starting every ``stride`` (default seq_len) tokens."""
    stride = stride or seq_len
    return (tokens - seq_len - 1) // stride + 1 if tokens > seq_len else 0


def _n(count: int, noun: str, plural: str = "") -> str:
    return f"{count:,} {noun if count == 1 else plural or noun + 's'}"


# --------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """Progress of one phase: a tqdm bar when stderr is a terminal, else a log line every ``every_s`` s.

    Counts ``unit`` s ("B" for bytes, shown as MB; "blocks"), with extra counts (tokens, shards)."""

    def __init__(self, label: str, log: Log, every_s: float, *, unit: str, total: Optional[int] = None,
                 done: int = 0):
        self.label, self.log, self.every_s, self.unit, self.total = label, log, every_s, unit, total
        self.done = self.initial = done
        self.counts: dict[str, str] = {}
        self.start = self.last = time.monotonic()
        self.bar = (tqdm(desc=label, total=total, initial=done, unit=unit, unit_scale=unit == "B",
                         unit_divisor=1000, file=sys.stderr, dynamic_ncols=True)
                    if sys.stderr.isatty() else None)

    def update(self, n: int, **counts: int) -> None:
        self.done += n
        self.counts = {k: f"{v:,}" for k, v in counts.items()}
        if self.bar is not None:
            self.bar.set_postfix(self.counts, refresh=False)
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.log(self.line())

    def line(self) -> str:
        scale, unit, digits = (1e6, "MB", 1) if self.unit == "B" else (1, self.unit, 0)
        elapsed = time.monotonic() - self.start
        of = f"/{self.total / scale:,.{digits}f}" if self.total is not None else ""
        counts = "".join(f", {v} {k}" for k, v in self.counts.items())
        rate = (self.done - self.initial) / scale / max(elapsed, 1e-9)
        return (f"{self.label}: {self.done / scale:,.{digits}f}{of} {unit}{counts}, {rate:,.1f} {unit}/s, "
                f"{elapsed:.1f} s")

    def close(self) -> None:
        """Closes the bar, or logs the final line."""
        if self.bar is not None:
            self.bar.close()
        else:
            self.log(self.line())


# --------------------------------------------------------------------------------------------
# Reading the inputs into batches (main process)


@dataclass
class _Batch:
    """Segments of about ``batch_mb`` raw bytes, and where reading stands once they are done."""

    index: int
    segments: list[Segment]
    nbytes: int
    cursor: Cursor
    skipped: int


class _BatchReader:
    """Reads ``files`` from ``cursor`` and groups their segments into numbered batches.

    Text files that are not UTF-8 are skipped (logged and counted in ``skipped``) before any of
    their bytes join a batch. Batch boundaries fall between segments, and segments depend only on
    the inputs, so the token stream does not depend on the batch size.
    """

    def __init__(self, files: list[Path], cursor: Cursor, skipped: int, first_index: int, batch_bytes: int,
                 log: Log):
        self.files, self.cursor, self.skipped = files, cursor, skipped
        self.index, self.batch_bytes, self.log = first_index, batch_bytes, log

    def __iter__(self) -> Iterator[_Batch]:
        segments: list[Segment] = []
        size = 0
        first, offset, lineno = self.cursor
        for i in range(first, len(self.files)):
            start = (offset, lineno) if i == first else (0, 1)
            for seg in self._segments(i, *start):
                segments.append(seg)
                size += len(seg.data)
                if size >= self.batch_bytes:
                    yield self._batch(segments, size, (i + 1, 0, 1) if seg.last else (i, *seg.next_position()))
                    segments, size = [], 0
        if segments:
            yield self._batch(segments, size, (len(self.files), 0, 1))

    def _segments(self, i: int, offset: int, lineno: int) -> Iterator[Segment]:
        path = self.files[i]
        try:
            yield from iter_segments(path, offset, lineno, jsonl_chunk=min(self.batch_bytes, READ_CHUNK))
        except NotUtf8 as exc:
            self.log(f"skipping {path}: not valid UTF-8 (near byte {exc.offset}); binary file?")
            self.skipped += 1
        except OSError as exc:
            raise PrepareError(f"cannot read input {path}: {exc}") from exc

    def _batch(self, segments: list[Segment], size: int, cursor: Cursor) -> _Batch:
        batch = _Batch(self.index, segments, size, cursor, self.skipped)
        self.index += 1
        return batch


# --------------------------------------------------------------------------------------------
# Jobs run by the workers (or in this process for a small input)

_TOKENIZER: Optional[Tokenizer] = None
"""The tokenizer of this process's jobs: set by :func:`_init_worker`, or by :class:`_Workers` inline."""


def _init_worker(tokenizer_pickle: bytes, main_alive: Connection) -> None:
    """Ctrl-C is the main process's to handle (it stops the pool cleanly); HF tokenizers must not
    start their own threads in a worker (set before the tokenizer is unpickled)."""
    global _TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_main, args=(main_alive,), daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = pickle.loads(tokenizer_pickle)


def _exit_with_main(main_alive: Connection) -> None:
    """Exit once the main process is gone, even killed with SIGKILL: a pool worker would otherwise
    wait for jobs forever (it holds the write end of its own job queue, so never sees EOF there).
    Only the main process holds the write end of ``main_alive``, so EOF here means it died."""
    try:
        main_alive.recv()
    except EOFError:
        pass
    os._exit(1)


def _where(seg: Segment) -> str:
    if seg.kind == "jsonl":
        last = seg.next_position()[1] - 1
        return f"{seg.path} (lines {seg.lineno}-{last})"
    return f"{seg.path} (bytes {seg.offset:,}-{seg.offset + len(seg.data):,})"


def _documents(seg: Segment, text_field: str) -> list[Piece]:
    try:
        return list(segment_documents(seg, text_field))
    except NotUtf8 as exc:
        raise PrepareError(
            f"{seg.path} changed during prepare (near byte {exc.offset} it is no longer valid UTF-8); "
            f"run prepare again with --restart on inputs that are not being written to"
        ) from None


def _tokenize_segments(segments: list[Segment], text_field: str, add_bos: bool, dtype: np.dtype) -> tuple[np.ndarray, int]:
    """The token stream of ``segments`` (BOS, if asked, before and EOS after each document) and
    the number of documents it ends."""
    tok = _TOKENIZER
    eos = np.array([tok.eos_id], dtype=dtype)
    bos = np.array([tok.bos_id], dtype=dtype) if add_bos else None
    parts: list[np.ndarray] = []
    documents = 0
    for seg in segments:
        pieces = _documents(seg, text_field)
        try:
            encoded = tok.encode_batch([p.text for p in pieces])
        except ValueError as exc:
            raise PrepareError(f"{_where(seg)}: {exc}") from None
        for piece, ids in zip(pieces, encoded):
            if bos is not None and piece.start:
                parts.append(bos)
            parts.append(ids)
            if piece.end:
                parts.append(eos)
                documents += 1
    if not parts:
        return np.empty(0, dtype=dtype), 0
    # Ids are < vocab_size, which the dtype was chosen to hold.
    return np.concatenate(parts, dtype=dtype, casting="unsafe"), documents


def _spill_path(work: Path, index: int) -> Path:
    return work / f"tokens-{index:06d}.bin"


def _tokenize_batch(batch: _Batch, *, work: str, text_field: str, add_bos: bool, dtype: str) -> tuple[int, int]:
    """Tokenize one batch into its spill file; (tokens, documents).

    The file is not fsynced: that would stall the worker on the disk for every batch, and a
    killed process loses nothing in the page cache. After a power cut, a batch recorded as done
    whose file came out short is caught by its size when resuming. The temporary name is per
    process, so a straggler of a killed run cannot collide with the resumed one.
    """
    ids, documents = _tokenize_segments(batch.segments, text_field, add_bos, np.dtype(dtype))
    path = _spill_path(Path(work), batch.index)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    ids.tofile(tmp)
    os.replace(tmp, path)
    return int(ids.size), documents


def _batch_chars(batch: _Batch, *, text_field: str) -> str:
    """The distinct characters of a batch (for fitting or checking a char vocabulary)."""
    chars: set[str] = set()
    for seg in batch.segments:
        for piece in _documents(seg, text_field):
            chars.update(piece.text)
    return "".join(sorted(chars))


@dataclass
class _BlockJob:
    """One block: ``rows`` rows cut from the spill ``ranges`` (file, first token, tokens), whose
    first ``owned`` tokens are this block's share of the split for counting documents."""

    index: int
    ranges: list[tuple[str, int, int]]
    rows: int
    owned: int
    seq_len: int
    stride: int
    dtype: str
    eos_id: int


def _encode_rows(job: _BlockJob) -> tuple[bytes, int, int]:
    """(zstd frame of the block, rows, documents ending in its owned tokens)."""
    dtype = np.dtype(job.dtype)
    tokens = np.concatenate([np.fromfile(path, dtype=dtype, count=count, offset=first * dtype.itemsize)
                             for path, first, count in job.ranges])
    span = (job.rows - 1) * job.stride + job.seq_len + 1
    rows = np.lib.stride_tricks.sliding_window_view(tokens[:span], job.seq_len + 1)[::job.stride]
    documents = int(np.count_nonzero(tokens[:job.owned] == job.eos_id))
    return encode_block(np.ascontiguousarray(rows)), job.rows, documents


# --------------------------------------------------------------------------------------------
# The worker pool


class _Workers:
    """Runs jobs on up to ``n`` worker processes, results in order, at most ``2n`` jobs in flight.

    The processes start on the first phase with more than one job (and not ``inline``), so a
    small input is done in this process without their start-up. They are forked from a
    "forkserver": a fresh process that imports this module once (~3 s: distlm imports torch), is
    reused by later pools of this process, and has never run a tokenizer (HF tokenizers misbehave
    when forked from a process that has). An error in a job is raised here as itself; a worker
    that dies is a :class:`PrepareError`.
    """

    def __init__(self, n: int):
        self.n = n
        self._pool: Optional[ProcessPoolExecutor] = None
        self._pool_tokenizer: Optional[Tokenizer] = None
        self._alive: tuple[Connection, Connection] = ()  # see _exit_with_main

    def map(self, fn: Callable[[Any], Any], jobs: Iterable[Any], tokenizer: Optional[Tokenizer] = None,
            inline: bool = False) -> Iterator[tuple[Any, Any]]:
        """(job, fn(job)) for every job, in order; ``tokenizer`` is the one ``fn`` needs, if any.
        ``inline`` runs them in this process: for work too small to pay for starting the pool."""
        jobs = iter(jobs)
        head = list(islice(jobs, 2))
        if inline or self.n == 1 or len(head) < 2:
            yield from self._inline(fn, chain(head, jobs), tokenizer)
            return
        pool = self._start(tokenizer)
        pending: deque[tuple[Any, Future]] = deque()
        try:
            for job in chain(head, jobs):
                pending.append((job, pool.submit(fn, job)))
                if len(pending) >= 2 * self.n:
                    yield self._take(pending)
            while pending:
                yield self._take(pending)
        finally:
            for _, future in pending:
                future.cancel()

    @staticmethod
    def _inline(fn: Callable[[Any], Any], jobs: Iterator[Any], tokenizer: Optional[Tokenizer]
                ) -> Iterator[tuple[Any, Any]]:
        global _TOKENIZER
        if tokenizer is not None:
            _TOKENIZER = tokenizer
        for job in jobs:
            yield job, fn(job)

    def _start(self, tokenizer: Optional[Tokenizer]) -> ProcessPoolExecutor:
        if self._pool is not None and tokenizer in (None, self._pool_tokenizer):
            return self._pool
        self.close()
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload([__name__])
        self._alive = context.Pipe(duplex=False)
        self._pool = ProcessPoolExecutor(self.n, mp_context=context, initializer=_init_worker,
                                         initargs=(pickle.dumps(tokenizer), self._alive[0]))
        self._pool_tokenizer = tokenizer
        return self._pool

    @staticmethod
    def _take(pending: deque[tuple[Any, Future]]) -> tuple[Any, Any]:
        job, future = pending.popleft()
        try:
            return job, future.result()
        except BrokenProcessPool:
            raise PrepareError(
                "a worker process died (killed, or out of memory: try fewer --workers or a smaller "
                "--batch-mb); run the same command again to resume"
            ) from None
        except InputError as exc:
            raise exc from None  # the message says it all; the worker's traceback would only bury it

    def close(self) -> None:
        """Stop the processes (jobs not started are cancelled, running ones finish)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            for end in self._alive:
                end.close()


# --------------------------------------------------------------------------------------------
# State of a preparation, for resuming


@dataclass(frozen=True)
class _Options:
    """The options that decide the output: a resume must use the same."""

    tokenizer: str
    seq_len: int
    val_fraction: float
    shard_mb: float
    block_rows: Optional[int]
    stride: Optional[int]
    text_field: str
    add_bos: bool


def _fingerprints(files: list[Path]) -> list[list]:
    """[path, size, mtime_ns] of every input: what a resume checks is unchanged."""
    out = []
    for path in files:
        st = path.stat()
        out.append([str(path), st.st_size, st.st_mtime_ns])
    return out


def _input_change(recorded: list[list], current: list[list]) -> Optional[str]:
    """What differs between two input fingerprints, in words; None if nothing."""
    was = {p: (size, mtime) for p, size, mtime in recorded}
    now = {p: (size, mtime) for p, size, mtime in current}
    for path in now.keys() - was.keys():
        return f"input {path} is new"
    for path in was.keys() - now.keys():
        return f"input {path} is gone"
    for path, (size, mtime) in now.items():
        if size != was[path][0]:
            return f"input {path} changed size ({was[path][0]:,} -> {size:,} bytes)"
        if mtime != was[path][1]:
            return f"input {path} was modified"
    if [p for p, _, _ in recorded] != [p for p, _, _ in current]:
        return "the inputs are in another order"
    return None


def _tokenizer_digest(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's spec (an HF tokenizer's includes the sha256 of its JSON)."""
    return hashlib.sha256(json.dumps(tok.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()


def _read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrepareError(f"cannot read {path} ({exc}); pass --restart to start over") from exc


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def _fresh_progress() -> dict[str, Any]:
    return {
        "tokenize": {"batches": 0, "tokens": 0, "documents": 0, "bytes": 0, "cursor": [0, 0, 1],
                     "skipped_files": 0, "done": False},
        "pack": {},
    }


# --------------------------------------------------------------------------------------------
# One preparation


class _Preparation:
    """The phases of one ``prepare_corpus`` call: open (fresh or resumed), tokenize, pack, finish."""

    def __init__(self, files: list[Path], out: Path, options: _Options, tok: Optional[Tokenizer], *,
                 workers: int, batch_bytes: int, inputs: list[str], log: Log, progress_s: float):
        self.files, self.out, self.options, self.tok = files, out, options, tok
        self.workers = _Workers(workers)
        self.batch_bytes, self.inputs, self.log, self.progress_s = batch_bytes, inputs, log, progress_s
        self.work = out / WORK_DIR
        self.progress = _fresh_progress()
        self.resumed = False

    # -- opening

    def open(self, restart: bool) -> None:
        """Resume the interrupted preparation in ``out`` if there is one, else start afresh."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise PrepareError(f"--out {out} is a file, not a folder; pick another --out")
        if (out / MANIFEST_NAME).exists():
            raise PrepareError(
                f"{out} already holds a prepared dataset ({out / MANIFEST_NAME} exists); "
                f"pick another --out or delete {out} first"
            )
        if restart and self.work.exists():
            shutil.rmtree(self.work)
            self.log(f"--restart: discarded the partial work of an interrupted prepare in {out}")
        state = _read_json(self.work / "state.json")
        if state is None:
            shutil.rmtree(self.work, ignore_errors=True)  # stopped before its state: nothing to resume
            self._remove_leftovers(keep=set())
            self._start()
        else:
            self._resume(state)

    def _remove_leftovers(self, keep: set[str]) -> None:
        """Shards and files of an interrupted run that are not part of what is resumed."""
        if not self.out.is_dir():
            return
        leftovers = sorted(p for p in self.out.iterdir()
                           if p.is_file() and _LEFTOVER_RE.match(p.name) and p.name not in keep)
        for p in leftovers:
            p.unlink()
        if leftovers:
            self.log(f"removed {len(leftovers)} files left in {self.out} by an interrupted prepare")

    def _start(self) -> None:
        if self.tok is None or isinstance(self.tok, CharTokenizer):
            self.tok = self._char_vocabulary(self.tok)
        self.work.mkdir(parents=True)
        self.tok.save(self.out / TOKENIZER_NAME)
        _write_json(self.work / "progress.json", self.progress)
        # Written last: a work folder without a state is discarded by the next run.
        _write_json(self.work / "state.json", {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "options": asdict(self.options),
            "tokenizer_sha256": _tokenizer_digest(self.tok),
            "inputs": _fingerprints(self.files),
        })

    def _char_vocabulary(self, given: Optional[CharTokenizer]) -> CharTokenizer:
        """Fit a char vocabulary on the inputs, or check that ``given`` covers them."""
        reader = _BatchReader(self.files, (0, 0, 1), 0, 0, self.batch_bytes, log=lambda _: None)
        progress = _Progress("char vocabulary", self.log, self.progress_s, unit="B")
        chars: set[str] = set()
        fn = partial(_batch_chars, text_field=self.options.text_field)
        for batch, got in self.workers.map(fn, reader):
            chars.update(got)
            progress.update(batch.nbytes)
        progress.close()
        if given is None:
            return CharTokenizer(chars)
        missing = sorted(chars - set(given.chars))
        if missing:
            raise PrepareError(
                f"{len(missing)} characters of the inputs are not in the given char tokenizer "
                f"(e.g. {''.join(missing[:20])!r}); use --tokenizer char to fit a new one on these inputs"
            )
        return given

    def _resume(self, state: dict[str, Any]) -> None:
        redo = "pass --restart to start over, or pick another --out"
        where = f"{self.out} holds an interrupted prepare"
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise PrepareError(f"{where} of another distlm version; {redo}")
        now = asdict(self.options)
        for key, was in state["options"].items():
            if now.get(key) != was:
                raise PrepareError(
                    f"{where} made with --{key.replace('_', '-')} {was!r}, not {now.get(key)!r}; run it "
                    f"again with the same options to resume, or {redo}"
                )
        change = _input_change(state["inputs"], _fingerprints(self.files))
        if change:
            raise PrepareError(f"cannot resume the interrupted prepare in {self.out}: {change} since it started; {redo}")
        if self.tok is None:  # a fitted char vocabulary: the one saved when the run started
            self.tok = self._load_saved_tokenizer(redo)
        if _tokenizer_digest(self.tok) != state["tokenizer_sha256"]:
            raise PrepareError(f"{where} made with another tokenizer than --tokenizer {self.options.tokenizer}; {redo}")
        self.progress = _read_json(self.work / "progress.json") or _fresh_progress()
        self.resumed = True
        if any(self.work.glob("tokens-*.bin")):  # gone only once every shard is written
            _Spill(self.work, self.progress["tokenize"], self.dtype)  # checks the recorded batches' sizes
        self._check_packed_shards(redo)

    def _load_saved_tokenizer(self, redo: str) -> Tokenizer:
        try:
            return load_tokenizer(self.out / TOKENIZER_NAME)
        except (OSError, ValueError) as exc:
            raise PrepareError(f"cannot load the tokenizer of the interrupted prepare ({exc}); {redo}") from exc

    def _check_packed_shards(self, redo: str) -> None:
        """Shards recorded as written must be there, whole; the rest are leftovers."""
        keep = {TOKENIZER_NAME}
        for split in self.progress["pack"].values():
            for shard in split["shards"]:
                path = self.out / shard["path"]
                if not path.is_file() or path.stat().st_size != shard["bytes"]:
                    raise PrepareError(f"shard {path} of the interrupted prepare is missing or damaged; {redo}")
                keep.add(shard["path"])
        self._remove_leftovers(keep)

    # -- tokenizing

    @property
    def dtype(self) -> np.dtype:
        return dtype_for_vocab(self.tok.vocab_size)

    def _save_progress(self) -> None:
        _write_json(self.work / "progress.json", self.progress)

    def _input_bytes(self) -> Optional[int]:
        """Total size to read, when known up front (no compressed inputs)."""
        if any(input_kind(p).endswith((".gz", ".zst")) for p in self.files):
            return None
        return sum(p.stat().st_size for p in self.files)

    def tokenize(self) -> None:
        """Tokenize the inputs into spill files, from the last batch recorded as done."""
        tk = self.progress["tokenize"]
        if tk["done"]:
            if self.resumed:
                self.log(f"resuming: all {_n(tk['batches'], 'batch', 'batches')} already tokenized")
            return
        if tk["batches"]:
            self.log(f"resuming: {_n(tk['batches'], 'batch', 'batches')} ({tk['bytes'] / 1e6:,.1f} MB, {tk['tokens']:,} "
                     f"tokens) already tokenized; continuing in {self.files[tk['cursor'][0]]}")
        reader = _BatchReader(self.files, tuple(tk["cursor"]), tk["skipped_files"], tk["batches"],
                              self.batch_bytes, self.log)
        fn = partial(_tokenize_batch, work=str(self.work), text_field=self.options.text_field,
                     add_bos=self.options.add_bos, dtype=self.dtype.str)
        progress = _Progress("tokenize", self.log, self.progress_s, unit="B", total=self._input_bytes(),
                             done=tk["bytes"])
        for batch, (tokens, documents) in self.workers.map(fn, reader, self.tok):
            tk.update(batches=batch.index + 1, tokens=tk["tokens"] + tokens, documents=tk["documents"] + documents,
                      bytes=tk["bytes"] + batch.nbytes, cursor=list(batch.cursor), skipped_files=batch.skipped)
            self._save_progress()
            progress.update(batch.nbytes, tokens=tk["tokens"])
        progress.close()
        tk.update(done=True, cursor=[len(self.files), 0, 1], skipped_files=reader.skipped)
        self._save_progress()

    # -- checking the totals

    def split_ranges(self) -> dict[str, tuple[int, int, int]]:
        """{split: (first token, tokens, stride)}; refuses (and discards the work) if a split is too small."""
        tk = self.progress["tokenize"]
        total = tk["tokens"]
        if total == 0:
            self._discard()
            raise PrepareError(
                f"no text found: {tk['skipped_files']} of {len(self.files)} input files were skipped as not "
                f"UTF-8, the rest are empty"
            )
        opts = self.options
        n_val = int(round(total * opts.val_fraction)) if opts.val_fraction > 0 else 0
        ranges = {"train": (0, total - n_val, opts.stride or opts.seq_len)}
        if opts.val_fraction > 0:
            ranges["val"] = (total - n_val, n_val, opts.seq_len)
        for name, (_, n, _) in ranges.items():
            if rows_for_tokens(n, opts.seq_len) < 1:
                self._discard()
                raise _split_too_small(name, n, opts.seq_len, total)
        return ranges

    def _discard(self) -> None:
        """Remove everything this preparation wrote: re-running cannot change a refusal."""
        shutil.rmtree(self.work, ignore_errors=True)
        (self.out / TOKENIZER_NAME).unlink(missing_ok=True)
        try:
            self.out.rmdir()
        except OSError:  # holds files of the user's
            pass

    # -- packing

    @property
    def block_rows(self) -> int:
        row_bytes = (self.options.seq_len + 1) * self.dtype.itemsize
        return self.options.block_rows or max(1, BLOCK_TARGET_BYTES // row_bytes)

    def pack(self, ranges: dict[str, tuple[int, int, int]]) -> dict[str, dict[str, Any]]:
        """Cut every split's rows from the spill into blocks and shards, from the last shard written."""
        plans = {name: self._plan(name, *r) for name, r in ranges.items()}
        total = sum(p["blocks"] for p in plans.values())
        done = sum(p["record"]["blocks"] for p in plans.values())
        if 0 < done < total:
            shards = sum(len(p["record"]["shards"]) for p in plans.values())
            self.log(f"resuming: {_n(shards, 'shard')} ({done:,} of {total:,} blocks) already written")
        spill = _Spill(self.work, self.progress["tokenize"], self.dtype) if done < total else None
        # As for tokenizing: the pool pays off from about two batches' worth of work.
        inline = self.progress["tokenize"]["tokens"] * self.dtype.itemsize < 2 * self.batch_bytes
        progress = _Progress("pack", self.log, self.progress_s, unit="blocks", total=total, done=done)
        splits = {name: self._pack_split(name, plan, spill, progress, inline) for name, plan in plans.items()}
        progress.close()
        return splits

    def _plan(self, name: str, first: int, tokens: int, stride: int) -> dict[str, Any]:
        rows = rows_for_tokens(tokens, self.options.seq_len, stride)
        record = self.progress["pack"].setdefault(name, {"blocks": 0, "documents": 0, "shards": []})
        return {"first": first, "tokens": tokens, "stride": stride, "rows": rows,
                "blocks": -(-rows // self.block_rows), "record": record}

    def _block_jobs(self, plan: dict[str, Any], spill: "_Spill") -> Iterator[_BlockJob]:
        L, S, b, R = self.options.seq_len, plan["stride"], self.block_rows, plan["rows"]
        for j in range(plan["record"]["blocks"], plan["blocks"]):
            r0, r1 = j * b, min(R, (j + 1) * b)
            start = plan["first"] + r0 * S
            span = (r1 - r0 - 1) * S + L + 1
            # Up to the next block's first token; the last block also owns the dropped tail.
            owned = (r1 * S if r1 < R else plan["tokens"]) - r0 * S
            yield _BlockJob(j, spill.ranges(start, start + max(span, owned)), r1 - r0, owned, L, S,
                            self.dtype.str, self.tok.eos_id)

    def _pack_split(self, name: str, plan: dict[str, Any], spill: Optional["_Spill"], progress: _Progress,
                    inline: bool) -> dict[str, Any]:
        record = plan["record"]
        writer: Optional[ShardWriter] = None
        blocks = documents = 0  # in the open shard
        shard_bytes = max(1, int(self.options.shard_mb * (1 << 20)))
        try:
            jobs = self._block_jobs(plan, spill) if record["blocks"] < plan["blocks"] else ()
            for job, (data, rows, docs) in self.workers.map(_encode_rows, jobs, inline=inline):
                if writer is None:
                    path = self.out / shard_file_name(name, len(record["shards"]))
                    writer = ShardWriter(path, dtype=self.dtype, row_len=self.options.seq_len + 1)
                writer.add_encoded(data, rows)
                blocks, documents = blocks + 1, documents + docs
                if writer.bytes_written >= shard_bytes or job.index == plan["blocks"] - 1:
                    record["shards"].append(writer.close().to_dict())
                    writer = None
                    record.update(blocks=record["blocks"] + blocks, documents=record["documents"] + documents)
                    blocks = documents = 0
                    self._save_progress()
                progress.update(1, shards=len(record["shards"]))
        finally:
            if writer is not None:
                writer.abort()
        R, S, L = plan["rows"], plan["stride"], self.options.seq_len
        return {
            "rows": R,
            "tokens": plan["tokens"],
            "dropped_tokens": plan["tokens"] - ((R - 1) * S + L + 1),
            "stride": S,
            "documents": record["documents"],
            "shards": record["shards"],
        }

    # -- finishing

    def finish(self, splits: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """Write the manifest (last: a folder with one is complete) and remove the work folder."""
        for path in self.work.glob("tokens-*.bin*"):  # the spill is big; the state is enough from here
            path.unlink()
        tk = self.progress["tokenize"]
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "seq_len": self.options.seq_len,
            "row_len": self.options.seq_len + 1,
            "dtype": self.dtype.name,
            "vocab_size": self.tok.vocab_size,
            "tokenizer": self.tok.to_dict(),
            "tokenizer_file": TOKENIZER_NAME,
            "documents": "eos",
            "add_bos": self.options.add_bos,
            "splits": splits,
            "source": {
                "inputs": self.inputs,
                "files": len(self.files) - tk["skipped_files"],
                "documents": tk["documents"],
                "tokens": tk["tokens"],
                "skipped_files": tk["skipped_files"],
            },
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        write_manifest(self.out, manifest)
        shutil.rmtree(self.work, ignore_errors=True)
        return manifest


class _Spill:
    """The token stream as the spill files hold it: a token range -> (file, first token, tokens) pieces."""

    def __init__(self, work: Path, tokenized: dict[str, Any], dtype: np.dtype):
        redo = "the interrupted prepare's work is damaged; pass --restart to start over"
        self.paths = [_spill_path(work, i) for i in range(tokenized["batches"])]
        try:
            sizes = [p.stat().st_size // dtype.itemsize for p in self.paths]
        except FileNotFoundError as exc:
            raise PrepareError(f"spill file {exc.filename} is missing: {redo}") from None
        self.starts = list(accumulate(sizes, initial=0))
        if self.starts[-1] != tokenized["tokens"]:
            raise PrepareError(f"the spill files in {work} hold {self.starts[-1]:,} tokens, "
                               f"not {tokenized['tokens']:,}: {redo}")

    def ranges(self, start: int, stop: int) -> list[tuple[str, int, int]]:
        out = []
        i = bisect_right(self.starts, start) - 1
        while start < stop:
            take = min(stop, self.starts[i + 1]) - start
            if take > 0:
                out.append((str(self.paths[i]), start - self.starts[i], take))
                start += take
            i += 1
        return out


# --------------------------------------------------------------------------------------------
# Checks and the entry point


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


def _check_options(seq_len: int, val_fraction: float, shard_mb: float, stride: Optional[int],
                   block_rows: Optional[int], workers: int, batch_mb: float) -> None:
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
    if workers < 1:
        raise PrepareError(f"workers must be >= 1, got {workers}")
    if not batch_mb > 0:
        raise PrepareError(f"batch_mb must be > 0, got {batch_mb}")


def _resolve_tokenizer(tokenizer: Union[str, os.PathLike, Tokenizer]) -> tuple[Optional[Tokenizer], str]:
    """(tokenizer, or None if a char vocabulary must be fitted; the spec as recorded for resuming)."""
    if not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer, f"<{tokenizer.name} tokenizer object>"
    spec = os.fspath(tokenizer)
    if spec == "char":
        return None, spec
    try:
        return load_tokenizer(spec), spec
    except ValueError as exc:
        raise PrepareError(str(exc)) from None


def _check_bos(tok: Optional[Tokenizer], add_bos: bool) -> None:
    if add_bos and getattr(tok, "bos_id", None) is None:
        name = tok.name if tok is not None else "char"
        raise PrepareError(
            f"--add-bos: the {name} tokenizer has no BOS token; drop --add-bos, or use a tokenizer "
            f"that has one (e.g. one trained by `distlm tokenizer train`)"
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
    workers: Optional[int] = None,
    restart: bool = False,
    add_bos: bool = False,
    batch_mb: float = DEFAULT_BATCH_MB,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into a dataset folder ``out_dir``; returns the manifest dict.

    ``tokenizer``: "byte", "char" (fitted on the inputs), a tokenizer object, or anything
    :func:`load_tokenizer` reads (a tokenizer.json, a sentencepiece .model, a dataset folder).
    ``val_fraction``: share of tokens, taken from the end of the stream, for the "val" split (0
    writes no val split). ``block_rows``: rows per block, default about 1 MiB of ids.
    ``shard_mb``: a shard is closed once it reaches about this many MB. ``stride``: training rows
    start every ``stride`` tokens (default seq_len: no overlap but the one target token); a
    smaller stride writes overlapping windows, which on a small corpus stands in for nanoGPT's
    random windows. Validation rows always use seq_len. ``workers``: processes that tokenize and
    compress (default: one per CPU). ``restart``: discard an interrupted run's work instead of
    resuming it. ``add_bos``: start every document with the tokenizer's BOS. ``batch_mb``: raw
    input bytes per tokenizing job (the output does not depend on it). Progress goes to
    ``log`` every ``progress_s`` seconds (a bar instead when stderr is a terminal).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    workers = (os.cpu_count() or 1) if workers is None else workers
    _check_options(seq_len, val_fraction, shard_mb, stride, block_rows, workers, batch_mb)
    if not inputs:
        raise PrepareError("no inputs given; pass text files, folders, .jsonl(.zst/.gz) or .gz files")
    tok, spec = _resolve_tokenizer(tokenizer)
    _check_bos(tok, add_bos)
    out = Path(out_dir)
    files = find_input_files(inputs, exclude=out)
    if not files:
        raise PrepareError(f"no input files found in {', '.join(map(str, inputs))} (hidden files are skipped)")

    t0 = time.monotonic()
    options = _Options(spec, seq_len, val_fraction, shard_mb, block_rows, stride, text_field, add_bos)
    run = _Preparation(files, out, options, tok, workers=workers, batch_bytes=max(1, int(batch_mb * 1e6)),
                       inputs=[os.fspath(p) for p in inputs], log=log, progress_s=progress_s)
    try:
        run.open(restart)
        bytes_before = run.progress["tokenize"]["bytes"]
        run.tokenize()
        splits = run.pack(run.split_ranges())
    except KeyboardInterrupt:
        log("interrupted: run the same command again to resume")
        raise
    finally:
        run.workers.close()
    manifest = run.finish(splits)
    _log_summary(log, out, manifest, run.tok, time.monotonic() - t0,
                 run.progress["tokenize"]["bytes"] - bytes_before, run.resumed)
    return manifest


def _log_summary(log: Log, out: Path, manifest: dict[str, Any], tok: Tokenizer, elapsed: float, nbytes: int,
                 resumed: bool) -> None:
    splits, source = manifest["splits"], manifest["source"]
    per_split = "; ".join(
        f"{name}: {_n(s['rows'], 'row')}, {_n(s['tokens'], 'token')} ({s['dropped_tokens']:,} dropped), "
        f"{_n(s['documents'], 'document')}, {_n(len(s['shards']), 'shard')}"
        for name, s in splits.items()
    )
    mb = nbytes / 1e6
    log(
        f"prepared {out}: {per_split}; {_n(source['documents'], 'document')} from {_n(source['files'], 'file')} "
        f"({source['skipped_files']} skipped); {tok.name} tokenizer, vocab {tok.vocab_size}; "
        f"{mb:.1f} MB {'tokenized after resuming ' if resumed else ''}in {elapsed:.1f} s "
        f"({mb / max(elapsed, 1e-9):.1f} MB/s)"
    )
