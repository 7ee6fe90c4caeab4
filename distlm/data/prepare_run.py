"""One ``distlm prepare`` run, phase by phase: open (fresh or resumed), tokenize, pack, finish.

:class:`Preparation` decides what is done and in which order, records how far it got after every
batch and shard (:mod:`.prepare_resume`) and writes the shards and the manifest; the reading and
the per-batch, per-block work are in :mod:`.prepare_jobs`.
"""

from __future__ import annotations

import re
import shutil
from bisect import bisect_right
from datetime import datetime, timezone
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .inputs import input_kind
from .prepare_common import Log, PrepareError, counted
from .prepare_jobs import BatchReader, BlockJob, Workers, batch_chars, encode_rows, spill_path, tokenize_batch
from .prepare_progress import Progress
from .prepare_resume import Options, check_resumable, fresh_progress, new_state, read_json, tokenizer_digest, \
    write_json
from .shards import (
    FORMAT,
    MANIFEST_NAME,
    TOKENIZER_NAME,
    VERSION,
    ShardWriter,
    dtype_for_vocab,
    shard_file_name,
    write_manifest,
)
from .tokenizers import CharTokenizer, Tokenizer, load_tokenizer

BLOCK_TARGET_BYTES = 1 << 20
"""Default uncompressed size of one block: the unit of decompression and of shuffling windows."""
WORK_DIR = ".prepare"
"""Folder under ``--out`` for the spill files and the resume state; removed when done."""

_LEFTOVER_RE = re.compile(r"^((train|val)-\d{6}\.tar|tokenizer\.json|manifest\.json)(\.tmp)?$")


def rows_for_tokens(tokens: int, seq_len: int, stride: Optional[int] = None) -> int:
    """Rows of seq_len+1 tokens, one starting every ``stride`` (default seq_len) tokens."""
    stride = stride or seq_len
    return (tokens - seq_len - 1) // stride + 1 if tokens > seq_len else 0


class Preparation:
    """The phases of one ``prepare_corpus`` call: open (fresh or resumed), tokenize, pack, finish."""

    def __init__(self, files: list[Path], out: Path, options: Options, tok: Optional[Tokenizer], *,
                 workers: int, batch_bytes: int, inputs: list[str], log: Log, progress_s: float):
        self.files, self.out, self.options, self.tok = files, out, options, tok
        self.workers = Workers(workers)
        self.batch_bytes, self.inputs, self.log, self.progress_s = batch_bytes, inputs, log, progress_s
        self.work = out / WORK_DIR
        self.progress = fresh_progress()
        self.resumed = False
        self.complete = False  # set by open: an earlier run finished; nothing left to do
        self.created_out = not out.exists()

    # -- opening

    def open(self, restart: bool) -> None:
        """Resume the interrupted preparation in ``out`` if there is one, else start afresh."""
        out = self.out
        if out.exists() and not out.is_dir():
            raise PrepareError(f"--out {out} is a file, not a folder; pick another --out")
        if (out / MANIFEST_NAME).exists():
            state = read_json(self.work / "state.json")
            if state is not None and not restart:
                # Killed after writing the manifest, before removing its work folder: done.
                check_resumable(state, self.options, self.files, out, "pick another --out or delete it first")
                shutil.rmtree(self.work)
                self.log(f"{out} was completed by an interrupted run of this command; removed its work folder")
                self.complete = True
                return
            raise PrepareError(
                f"{out} already holds a prepared dataset ({out / MANIFEST_NAME} exists); "
                f"pick another --out or delete {out} first"
            )
        if restart and self.work.exists():
            shutil.rmtree(self.work)
            self._remove_leftovers(keep=set())  # the work folder vouched for them: they were ours
            self.log(f"--restart: discarded the partial work of an interrupted prepare in {out}")
        state = read_json(self.work / "state.json")
        if state is None:
            if self.work.exists():  # stopped before its state: nothing to resume, only its files to remove
                shutil.rmtree(self.work)
                self._remove_leftovers(keep=set())
            else:
                self._refuse_foreign_files()
            self._start()
        else:
            self._resume(state)

    def _refuse_foreign_files(self) -> None:
        """Never overwrite (or later delete) files that no prepare of ours left in ``out``."""
        if not self.out.is_dir():
            return
        clash = sorted(p.name for p in self.out.iterdir() if _LEFTOVER_RE.match(p.name))
        if clash:
            raise PrepareError(f"--out {self.out} already holds {', '.join(clash[:5])}, not from an interrupted "
                               f"prepare (no {WORK_DIR}/ there); pick another --out or move those files")

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
        write_json(self.work / "progress.json", self.progress)
        # Written last: a work folder without a state is discarded by the next run.
        write_json(self.work / "state.json", new_state(self.options, self.tok, self.files))

    def _char_vocabulary(self, given: Optional[CharTokenizer]) -> CharTokenizer:
        """Fit a char vocabulary on the inputs, or check that ``given`` covers them."""
        reader = BatchReader(self.files, (0, 0, 1), 0, 0, self.batch_bytes, log=lambda _: None)
        progress = Progress("char vocabulary", self.log, self.progress_s, unit="B")
        chars: set[str] = set()
        fn = partial(batch_chars, text_field=self.options.text_field)
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
        check_resumable(state, self.options, self.files, self.out, redo)
        if self.tok is None:  # a fitted char vocabulary: the one saved when the run started
            self.tok = self._load_saved_tokenizer(redo)
        if tokenizer_digest(self.tok) != state["tokenizer_sha256"]:
            raise PrepareError(f"{self.out} holds an interrupted prepare made with another tokenizer than "
                               f"--tokenizer {self.options.tokenizer}; {redo}")
        self.progress = read_json(self.work / "progress.json") or fresh_progress()
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
        write_json(self.work / "progress.json", self.progress)

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
                self.log(f"resuming: all {counted(tk['batches'], 'batch', 'batches')} already tokenized")
            return
        if tk["batches"]:
            self.log(f"resuming: {counted(tk['batches'], 'batch', 'batches')} ({tk['bytes'] / 1e6:,.1f} MB, "
                     f"{tk['tokens']:,} tokens) already tokenized; continuing in {self.files[tk['cursor'][0]]}")
        reader = BatchReader(self.files, tuple(tk["cursor"]), tk["skipped_files"], tk["batches"],
                             self.batch_bytes, self.log)
        fn = partial(tokenize_batch, work=str(self.work), text_field=self.options.text_field,
                     add_bos=self.options.add_bos, dtype=self.dtype.str)
        progress = Progress("tokenize", self.log, self.progress_s, unit="B", total=self._input_bytes(),
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
        if self.created_out:
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
            self.log(f"resuming: {counted(shards, 'shard')} ({done:,} of {total:,} blocks) already written")
        spill = _Spill(self.work, self.progress["tokenize"], self.dtype) if done < total else None
        # As for tokenizing: the pool pays off from about two batches' worth of work.
        inline = self.progress["tokenize"]["tokens"] * self.dtype.itemsize < 2 * self.batch_bytes
        progress = Progress("pack", self.log, self.progress_s, unit="blocks", total=total, done=done)
        splits = {name: self._pack_split(name, plan, spill, progress, inline) for name, plan in plans.items()}
        progress.close()
        return splits

    def _plan(self, name: str, first: int, tokens: int, stride: int) -> dict[str, Any]:
        rows = rows_for_tokens(tokens, self.options.seq_len, stride)
        record = self.progress["pack"].setdefault(name, {"blocks": 0, "documents": 0, "shards": []})
        return {"first": first, "tokens": tokens, "stride": stride, "rows": rows,
                "blocks": -(-rows // self.block_rows), "record": record}

    def _block_jobs(self, plan: dict[str, Any], spill: "_Spill") -> Iterator[BlockJob]:
        L, S, b, R = self.options.seq_len, plan["stride"], self.block_rows, plan["rows"]
        for j in range(plan["record"]["blocks"], plan["blocks"]):
            r0, r1 = j * b, min(R, (j + 1) * b)
            start = plan["first"] + r0 * S
            span = (r1 - r0 - 1) * S + L + 1
            # Up to the next block's first token; the last block also owns the dropped tail.
            owned = (r1 * S if r1 < R else plan["tokens"]) - r0 * S
            yield BlockJob(j, spill.ranges(start, start + max(span, owned)), r1 - r0, owned, L, S,
                           self.dtype.str, self.tok.eos_id, str(self.work / f"block-{j:08d}.zst"))

    def _pack_split(self, name: str, plan: dict[str, Any], spill: Optional["_Spill"], progress: Progress,
                    inline: bool) -> dict[str, Any]:
        record = plan["record"]
        writer: Optional[ShardWriter] = None
        blocks = documents = 0  # in the open shard
        shard_bytes = max(1, int(self.options.shard_mb * (1 << 20)))
        try:
            jobs = self._block_jobs(plan, spill) if record["blocks"] < plan["blocks"] else ()
            for job, (frame_path, rows, docs) in self.workers.map(encode_rows, jobs, inline=inline):
                if writer is None:
                    path = self.out / shard_file_name(name, len(record["shards"]))
                    writer = ShardWriter(path, dtype=self.dtype, row_len=self.options.seq_len + 1)
                frame = Path(frame_path)
                writer.add_encoded(frame.read_bytes(), rows)
                frame.unlink()
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
        # Only now: killed before this, the same command finds the manifest and the matching
        # state and just cleans up (see open); the spill is needed until the manifest exists.
        shutil.rmtree(self.work, ignore_errors=True)
        return manifest


class _Spill:
    """The token stream as the spill files hold it: a token range -> (file, first token, tokens) pieces."""

    def __init__(self, work: Path, tokenized: dict[str, Any], dtype: np.dtype):
        redo = "the interrupted prepare's work is damaged; pass --restart to start over"
        self.paths = [spill_path(work, i) for i in range(tokenized["batches"])]
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
