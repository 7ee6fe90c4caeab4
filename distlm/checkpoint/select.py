"""Which checkpoint a run continues from, checked before anything is loaded.

``latest`` is a hint: the folder it names is tried first, then the other ``step-N`` folders
newest first. A folder counts only if its manifest verifies (sizes always, SHA-256 unless
``checkpoint.verify=size``); a damaged one is skipped with a warning naming the file, or is an
error with ``checkpoint.on_damaged=fail``. Checkpoints that exist but none of which verifies
stop the run: it never quietly starts from scratch over a run it could not read.

Leftovers of interrupted operations, handled before choosing:

* ``step-N.tmp``: a save that never committed; never loaded, removed.
* ``step-N.replaced``: an older ``step-N`` moved aside by a commit of the same step; if the kill
  came before the new folder took its name, it is put back (it was a valid checkpoint).
* ``step-N.deleting``: a deletion by retention that was interrupted; removed.

The hashing can be shared among ranks (``share=(rank, world_size)``): on a checkpoint of
hundreds of GB, one rank alone would take longer than the process group's timeout.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Callable, Optional

from distlm.checkpoint import manifest as manifest_file
from distlm.checkpoint.commit import LATEST, REPLACED_SUFFIX, TMP_SUFFIX
from distlm.checkpoint.errors import CheckpointError
from distlm.checkpoint.manifest import ManifestError

TAG_RE = re.compile(r"^step-(\d{8})$")
_LEFTOVER_RE = re.compile(r"^step-(\d{8})(\.tmp|\.replaced|\.deleting)$")
DELETING_SUFFIX = ".deleting"


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
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if _LEFTOVER_RE.match(p.name))


def recover_replaced(ckpt_dir: Path, log: Callable[[str], None] = print) -> None:
    """Put back a ``step-N`` that a commit moved aside before the new one took its place."""
    for path in leftovers(ckpt_dir):
        final = path.with_name(path.name[: -len(REPLACED_SUFFIX)])
        if path.name.endswith(REPLACED_SUFFIX) and not final.exists():
            path.rename(final)
            log(f"WARNING: put {final.name} back: a save of the same step was killed while replacing it")


def clean_leftovers(ckpt_dir: Path, log: Callable[[str], None] = print, keep: Optional[Path] = None) -> list[str]:
    removed = []
    for path in leftovers(ckpt_dir):
        if keep is not None and path.resolve() == Path(keep).resolve():
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    if removed:
        log(f"removed unfinished checkpoint folders {', '.join(removed)} (interrupted saves or deletions)")
    return removed


def check(folder: Path, hashes: bool, share: tuple[int, int] = (0, 1)) -> None:
    """Verify ``folder`` (this rank's share of the hashing); ManifestError naming what is wrong."""
    if not (folder / manifest_file.MANIFEST).is_file() and (folder / "distlm.json").is_file():
        raise ManifestError(f"{folder} was saved by a distlm older than checkpoint format {manifest_file.FORMAT} "
                            f"(no {manifest_file.MANIFEST}); resume it with that version, or start anew in another run.dir")
    manifest_file.verify(folder, hashes=hashes, share=share)


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


def candidates(resume: str, ckpt_dir: Path, log: Callable[[str], None] = print) -> list[Path]:
    """Folders to try, in order (an explicit ``train.resume=PATH`` is the only one)."""
    if resume == "never":
        return []
    if resume != "auto":
        return [Path(resume)]
    recover_replaced(ckpt_dir, log)
    hint = _latest_hint(ckpt_dir, log)
    return ([hint] if hint else []) + [p for p in reversed(step_folders(ckpt_dir)) if p != hint]


def choose(resume: str, ckpt_dir: Path, tried: list[tuple[Path, Optional[str]]], on_damaged: str,
           log: Callable[[str], None] = print) -> Optional[Path]:
    """Pick from ``tried`` (each candidate with its verification error or None), or raise."""
    damaged = []
    for folder, error in tried:
        if error is None:
            if damaged:
                log(f"WARNING: resuming from {folder.name} instead: the steps after it are redone")
            return folder
        if resume != "auto":
            raise CheckpointError(f"train.resume={resume}: {error}")
        if on_damaged == "fail":
            raise CheckpointError(f"{error}. checkpoint.on_damaged=fail: stopping; set it to fallback to continue "
                                  f"from an older checkpoint, or repair/restore the file")
        log(f"WARNING: checkpoint {folder.name} cannot be used: {error}")
        damaged.append(f"{folder.name} ({error})")
    if damaged:
        raise CheckpointError(f"{ckpt_dir} holds checkpoints but none verifies: {'; '.join(damaged)}. Not starting "
                              f"from scratch over them: restore a checkpoint, point train.resume at one, or use "
                              f"another run.dir / checkpoint.dir for a new run")
    unfinished = [p.name for p in leftovers(ckpt_dir) if p.name.endswith(TMP_SUFFIX)]
    if unfinished:
        log(f"WARNING: {ckpt_dir} holds only unfinished saves ({', '.join(unfinished)}): no checkpoint was ever "
            f"committed, so the run starts from step 0")
    return None


def refuse_fresh_start_over(ckpt_dir: Path) -> None:
    """``train.resume=never`` in a folder with checkpoints would mix two runs' steps: refuse."""
    existing = [p.name for p in step_folders(ckpt_dir)]
    if existing:
        raise CheckpointError(f"train.resume=never, but {ckpt_dir} holds checkpoints of an earlier run "
                              f"({', '.join(existing[-3:])}); a new run there would mix its steps with them. "
                              f"Use another run.dir or checkpoint.dir, or delete them")


def find_resume(resume: str, ckpt_dir: str | Path, verify: str = "hash", on_damaged: str = "fallback",
                log: Callable[[str], None] = print) -> Optional[Path]:
    """The checkpoint folder to continue from, verified in this process; None for a fresh start."""
    ckpt_dir = Path(ckpt_dir)
    if resume == "never":
        return None
    tried = []
    for folder in candidates(resume, ckpt_dir, log):
        try:
            check(folder, verify == "hash")
            tried.append((folder, None))
            break
        except ManifestError as e:
            tried.append((folder, str(e)))
            if on_damaged == "fail" or resume != "auto":
                break
    return choose(resume, ckpt_dir, tried, on_damaged, log)


def delete_checkpoint(folder: Path) -> None:
    """Rename first (one atomic step), then delete: a kill midway leaves a ``.deleting`` folder, not a damaged step."""
    doomed = folder.with_name(folder.name + DELETING_SUFFIX)
    shutil.rmtree(doomed, ignore_errors=True)
    folder.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)
