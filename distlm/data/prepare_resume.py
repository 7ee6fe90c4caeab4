"""What a ``distlm prepare`` records so that an interrupted one can resume.

``OUT/.prepare/state.json`` records what is being prepared (options, tokenizer, every input's
path, size and mtime) and ``progress.json`` how far it got (rewritten atomically after every
batch and every shard). Run with the same command, an interrupted prepare (Ctrl-C, a crash,
SIGKILL) continues from the last finished batch or shard and writes the same bytes as an
uninterrupted run; a run whose inputs or options differ is refused, naming the change
(``restart`` discards the partial work). The work folder goes once the manifest is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from distlm.fsutil import atomic_write_text

from .prepare_common import PrepareError
from .tokenizers import Tokenizer

STATE_FORMAT = "distlm.prepare-state"
STATE_VERSION = 1


@dataclass(frozen=True)
class Options:
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
    """What differs between two input _fingerprints, in words; None if nothing."""
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


def tokenizer_digest(tok: Tokenizer) -> str:
    """sha256 of the tokenizer's spec (an HF tokenizer's includes the sha256 of its JSON)."""
    return hashlib.sha256(json.dumps(tok.to_dict(), sort_keys=True).encode("utf-8")).hexdigest()


def read_json(path: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PrepareError(f"cannot read {path} ({exc}); pass --restart to start over") from exc


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def fresh_progress() -> dict[str, Any]:
    return {
        "tokenize": {"batches": 0, "tokens": 0, "documents": 0, "bytes": 0, "cursor": [0, 0, 1],
                     "skipped_files": 0, "done": False},
        "pack": {},
    }


def new_state(options: Options, tok: Tokenizer, files: list[Path]) -> dict[str, Any]:
    """The ``state.json`` of a preparation that starts now."""
    return {
        "format": STATE_FORMAT,
        "version": STATE_VERSION,
        "options": asdict(options),
        "tokenizer_sha256": tokenizer_digest(tok),
        "inputs": _fingerprints(files),
    }


def check_resumable(state: dict[str, Any], options: Options, files: list[Path], out: Path, redo: str) -> None:
    """Refuse to resume the preparation in ``out`` from ``state`` if its format, options or
    inputs differ; ``redo`` says what to do instead. (The tokenizer is checked once loaded.)"""
    where = f"{out} holds an interrupted prepare"
    if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise PrepareError(f"{where} of another distlm version; {redo}")
    now = asdict(options)
    for key, was in state["options"].items():
        if now.get(key) != was:
            raise PrepareError(
                f"{where} made with --{key.replace('_', '-')} {was!r}, not {now.get(key)!r}; run it "
                f"again with the same options to resume, or {redo}"
            )
    change = _input_change(state["inputs"], _fingerprints(files))
    if change:
        raise PrepareError(f"cannot resume the interrupted prepare in {out}: {change} since it started; {redo}")
