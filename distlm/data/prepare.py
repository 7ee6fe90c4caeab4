"""``distlm prepare``: turn text files and JSONL into tokenized, packed, sharded training rows.

Inputs are text files, folders of them (walked recursively in sorted order), JSONL files
(``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``; one JSON object per line, the text under
``text_field``; blank lines are skipped) and gzipped text (any other ``.gz``). Every file, or
every JSONL record, is one document. Text files that are not valid UTF-8 (binaries) are skipped
with one log line each and counted in the manifest as ``skipped_files``; a JSONL line that is
not valid UTF-8 or JSON stops the run, naming the file and line.

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

This module checks the options and runs the phases; the rest lives next to it:
:mod:`.prepare_run` (the phases of one run: tokenize, pack, write the manifest),
:mod:`.prepare_jobs` (reading the inputs, the jobs run by worker processes, how it scales),
:mod:`.prepare_resume` (what is recorded to resume an interrupted run, and when one is refused),
:mod:`.prepare_progress` (progress bars and lines) and :mod:`.prepare_common` (the error).

Called from a script, guard the call with ``if __name__ == "__main__":``: the workers import
the main module (they are started as by multiprocessing's "forkserver").
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from .inputs import find_input_files
from .shards import MANIFEST_NAME
from .prepare_common import Log, PrepareError, counted
from .prepare_resume import Options
from .prepare_run import BLOCK_TARGET_BYTES, WORK_DIR, Preparation, rows_for_tokens
from .tokenizers import Tokenizer, load_tokenizer

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
    workers = _usable_cpus() if workers is None else workers
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
    options = Options(spec, seq_len, val_fraction, shard_mb, block_rows, stride, text_field, add_bos)
    run = Preparation(files, out, options, tok, workers=workers, batch_bytes=max(1, int(batch_mb * 1e6)),
                      inputs=[os.fspath(p) for p in inputs], log=log, progress_s=progress_s)
    try:
        run.open(restart)
        if run.complete:
            return json.loads((out / MANIFEST_NAME).read_text(encoding="utf-8"))
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


def _usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (which containers and SLURM set), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _log_summary(log: Log, out: Path, manifest: dict[str, Any], tok: Tokenizer, elapsed: float, nbytes: int,
                 resumed: bool) -> None:
    splits, source = manifest["splits"], manifest["source"]
    per_split = "; ".join(
        f"{name}: {counted(s['rows'], 'row')}, {counted(s['tokens'], 'token')} ({s['dropped_tokens']:,} dropped), "
        f"{counted(s['documents'], 'document')}, {counted(len(s['shards']), 'shard')}"
        for name, s in splits.items()
    )
    mb = nbytes / 1e6
    log(
        f"prepared {out}: {per_split}; {counted(source['documents'], 'document')} "
        f"from {counted(source['files'], 'file')} "
        f"({source['skipped_files']} skipped); {tok.name} tokenizer, vocab {tok.vocab_size}; "
        f"{mb:.1f} MB {'tokenized after resuming ' if resumed else ''}in {elapsed:.1f} s "
        f"({mb / max(elapsed, 1e-9):.1f} MB/s)"
    )
