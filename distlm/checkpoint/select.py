"""Which checkpoint a run continues from, checked before anything is loaded.

``latest`` is a hint: the folder it names is tried first, then the other ``step-N`` folders
newest first. A folder counts only if its manifest verifies (sizes always, SHA-256 unless
``checkpoint.verify=size``); a damaged one is skipped with a warning naming the file, or is an
error with ``checkpoint.on_damaged=fail``. Checkpoints that exist but none of which verifies
stop the run: it never quietly starts from scratch over a run it could not read.
``step-N.tmp`` folders are saves that never committed: never loaded, removed at the next start.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from distlm.checkpoint import manifest as manifest_file
from distlm.checkpoint.commit import LATEST, STALE_SUFFIX, TMP_SUFFIX
from distlm.checkpoint.errors import CheckpointError
from distlm.checkpoint.manifest import ManifestError

TAG_RE = re.compile(r"^step-(\d{8})$")
_LEFTOVER_RE = re.compile(r"^step-\d{8}(\.tmp|\.stale)$")


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def step_of(folder: Path) -> int:
    return int(TAG_RE.match(folder.name).group(1))


def step_folders(ckpt_dir: Path) -> list[Path]:
    """Every ``step-N`` folder (committed or damaged), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name)), key=lambda p: p.name)


def leftovers(ckpt_dir: Path) -> list[Path]:
    """Folders of saves that never committed (``.tmp``) or of half-finished deletions (``.stale``)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if _LEFTOVER_RE.match(p.name))


def clean_leftovers(ckpt_dir: Path, log: Callable[[str], None] = print) -> list[str]:
    removed = []
    for path in leftovers(ckpt_dir):
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    if removed:
        log(f"removed unfinished checkpoint folders {', '.join(removed)} (interrupted saves or deletions)")
    return removed


def _check(folder: Path, hashes: bool) -> None:
    if not (folder / manifest_file.MANIFEST).is_file() and (folder / "distlm.json").is_file():
        raise ManifestError(f"{folder} was saved by a distlm older than checkpoint format {manifest_file.FORMAT} "
                            f"(no {manifest_file.MANIFEST}); resume it with that version, or set train.resume=never")
    manifest_file.verify(folder, hashes=hashes)


def _latest_hint(ckpt_dir: Path, log: Callable[[str], None]) -> Optional[Path]:
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    try:
        tag = pointer.read_text().strip()
    except (OSError, UnicodeDecodeError):
        tag = ""
    if TAG_RE.match(tag) and (ckpt_dir / tag).is_dir():
        return ckpt_dir / tag
    log(f"WARNING: {pointer} holds {tag[:40]!r}, which names no checkpoint folder (empty, torn, or deleted); "
        f"using the newest checkpoint that verifies instead")
    return None


def find_resume(resume: str, ckpt_dir: str | Path, verify: str = "hash", on_damaged: str = "fallback",
                log: Callable[[str], None] = print) -> Optional[Path]:
    """The checkpoint folder to continue from, verified; None for a fresh start (see module doc)."""
    ckpt_dir = Path(ckpt_dir)
    hashes = verify == "hash"
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        try:
            _check(path, hashes)
        except ManifestError as e:
            raise CheckpointError(f"train.resume={resume}: {e}") from None
        return path
    hint = _latest_hint(ckpt_dir, log)
    candidates = ([hint] if hint else []) + [p for p in reversed(step_folders(ckpt_dir)) if p != hint]
    damaged = []
    for folder in candidates:
        try:
            _check(folder, hashes)
        except ManifestError as e:
            if on_damaged == "fail":
                raise CheckpointError(f"{e}. checkpoint.on_damaged=fail: stopping; set it to fallback to continue "
                                      f"from an older checkpoint, or repair/restore the file") from None
            log(f"WARNING: checkpoint {folder.name} cannot be used: {e}")
            damaged.append(f"{folder.name} ({e})")
            continue
        if damaged:
            log(f"WARNING: falling back to {folder.name}, an OLDER checkpoint: the steps after it are redone")
        return folder
    if damaged:
        raise CheckpointError(f"{ckpt_dir} holds checkpoints but none verifies: {'; '.join(damaged)}. Not starting "
                              f"from scratch over them: restore a checkpoint, point train.resume at one, or set "
                              f"train.resume=never (or another checkpoint.dir) to start a new run")
    unfinished = [p.name for p in leftovers(ckpt_dir) if p.name.endswith(TMP_SUFFIX)]
    if unfinished:
        log(f"WARNING: {ckpt_dir} holds only unfinished saves ({', '.join(unfinished)}): no checkpoint was ever "
            f"committed, so the run starts from step 0")
    return None


def delete_checkpoint(folder: Path) -> None:
    """Rename first (one atomic step), then delete: a kill midway leaves a ``.stale`` folder, not a damaged step."""
    stale = folder.with_name(folder.name + STALE_SUFFIX)
    shutil.rmtree(stale, ignore_errors=True)
    folder.rename(stale)
    shutil.rmtree(stale, ignore_errors=True)
