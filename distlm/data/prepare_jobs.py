"""The work of ``distlm prepare`` that runs in worker processes, and what feeds and runs it.

How it scales. The main process reads the inputs sequentially (decompressing, cutting whole
JSONL lines or text pieces: :class:`BatchReader`) and hands batches of about ``batch_mb`` of raw
bytes to ``workers`` worker processes (:class:`Workers`), which parse JSON, tokenize and write
each batch's ids to a spill file in ``OUT/.prepare/`` (:func:`tokenize_batch`). Since the
validation split is the stream's tail, its start is only known once everything is tokenized;
rows are then cut from the spill files and compressed into blocks by the workers
(:func:`encode_rows`), and the main process writes them to shards in order. At most two jobs per
worker are in flight, so memory stays flat whatever the corpus size. The output depends on
neither the number of workers nor the batch size.

The workers import this module (see :class:`Workers`), so it imports nothing heavy: no torch.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
import threading
from collections import deque
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import chain, islice
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np

from .inputs import READ_CHUNK, InputError, NotUtf8, Piece, Segment, iter_segments, segment_documents
from .prepare_common import Log, PrepareError
from .shards import encode_block
from .tokenizers import Tokenizer

Cursor = tuple[int, int, int]
"""Where reading the inputs continues: (file index, offset in its decompressed bytes, line number)."""


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


class BatchReader:
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
"""The tokenizer of this process's jobs: set by :func:`_init_worker`, or by :class:`Workers` inline."""


def _init_worker(tokenizer_pickle: bytes, main_alive: Connection) -> None:
    """Ctrl-C is the main process's to handle (it stops the pool cleanly); HF tokenizers must not
    start their own threads in a worker (set before the tokenizer is unpickled)."""
    global _TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_main, args=(main_alive,), daemon=True).start()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    # The bytes come from this run's main process over the pool's private pipe (multiprocessing
    # pickles every job the same way), never from a file or the network.
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


def spill_path(work: Path, index: int) -> Path:
    return work / f"tokens-{index:06d}.bin"


def tokenize_batch(batch: _Batch, *, work: str, text_field: str, add_bos: bool, dtype: str) -> tuple[int, int]:
    """Tokenize one batch into its spill file; (tokens, documents).

    The file is not fsynced: that would stall the worker on the disk for every batch, and a
    killed process loses nothing in the page cache. After a power cut, a batch recorded as done
    whose file came out short is caught by its size when resuming. The temporary name is per
    process, so a straggler of a killed run cannot collide with the resumed one.
    """
    ids, documents = _tokenize_segments(batch.segments, text_field, add_bos, np.dtype(dtype))
    path = spill_path(Path(work), batch.index)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    ids.tofile(tmp)
    os.replace(tmp, path)
    return int(ids.size), documents


def batch_chars(batch: _Batch, *, text_field: str) -> str:
    """The distinct characters of a batch (for fitting or checking a char vocabulary)."""
    chars: set[str] = set()
    for seg in batch.segments:
        for piece in _documents(seg, text_field):
            chars.update(piece.text)
    return "".join(sorted(chars))


@dataclass
class BlockJob:
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
    frame_path: str


def encode_rows(job: BlockJob) -> tuple[str, int, int]:
    """(file holding the block's zstd frame, rows, documents ending in its owned tokens).

    The frame goes through a file, not the result pipe: a worker that dies while sending a
    result larger than the pipe's buffer would leave the pool waiting for the rest forever.
    """
    dtype = np.dtype(job.dtype)
    tokens = np.concatenate([np.fromfile(path, dtype=dtype, count=count, offset=first * dtype.itemsize)
                             for path, first, count in job.ranges])
    span = (job.rows - 1) * job.stride + job.seq_len + 1
    rows = np.lib.stride_tricks.sliding_window_view(tokens[:span], job.seq_len + 1)[::job.stride]
    documents = int(np.count_nonzero(tokens[:job.owned] == job.eos_id))
    with open(job.frame_path, "wb") as f:
        f.write(encode_block(np.ascontiguousarray(rows)))
    return job.frame_path, job.rows, documents


# --------------------------------------------------------------------------------------------
# The worker pool


class Workers:
    """Runs jobs on up to ``n`` worker processes, results in order, at most ``2n`` jobs in flight.

    The processes start on the first phase with more than one job (and not ``inline``), so a
    small input is done in this process without their start-up. They are forked from a
    "forkserver": a fresh process that imports this module once (it holds every job, so pickled
    jobs resolve without further imports), is reused by later pools of this process, and has
    never run a tokenizer (HF tokenizers misbehave when forked from a process that has). An error
    in a job is raised here as itself; a worker that dies is a :class:`PrepareError`.
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
                try:
                    pending.append((job, pool.submit(fn, job)))
                except BrokenProcessPool:
                    raise _worker_died() from None
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
            raise _worker_died() from None
        except InputError as exc:
            raise exc from None  # the message says it all; the worker's traceback would only bury it

    def close(self) -> None:
        """Stop the processes (jobs not started are cancelled, running ones finish)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
            for end in self._alive:
                end.close()


def _worker_died() -> PrepareError:
    return PrepareError("a worker process died (killed, or out of memory: try fewer --workers or a smaller "
                        "--batch-mb); run the same command again to resume")
