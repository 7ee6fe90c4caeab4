"""The commit of a checkpoint: the only moment a new step becomes visible to a loader.

Every rank's files are already in ``step-N.tmp/`` and fsync'd, the folder too (see
:mod:`distlm.checkpoint.files`). The committing rank then::

    manifest.json -> fsync -> fsync step-N.tmp/ -> rename to step-N/ -> fsync the parent
    -> latest.tmp -> fsync -> rename over latest -> fsync the parent

A kill anywhere leaves either the old checkpoint (no manifest, or still ``.tmp``: never
loaded, cleaned at the next start) or the new one, whole; ``latest`` is only a hint that a
torn or stale value cannot mislead (the loader checks it and falls back). The order is tested
with a recording of the system calls (tests/test_checkpoint_commit.py): a kill test cannot see a
missing fsync, a power cut can.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from distlm.checkpoint.manifest import MANIFEST
from distlm.fault import inject
from distlm.fsutil import atomic_write_text, fsync_dir, write_durable

LATEST = "latest"
TMP_SUFFIX = ".tmp"
REPLACED_SUFFIX = ".replaced"


def commit(tmp: Path, manifest: dict) -> Path:
    """Publish ``step-N.tmp`` as ``step-N`` and point ``latest`` at it; return the final folder."""
    step = manifest["step"]
    final = tmp.with_name(tmp.name[: -len(TMP_SUFFIX)])
    inject.hit("save.before_manifest", step)
    write_durable(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    fsync_dir(tmp)
    inject.hit("save.before_rename", step)
    replaced = None
    if final.exists():
        # The same step saved before (a run resumed from an older checkpoint redoes it): moved
        # aside, not deleted first; a kill before the next rename leaves it to be put back.
        replaced = final.with_name(final.name + REPLACED_SUFFIX)
        shutil.rmtree(replaced, ignore_errors=True)
        os.rename(final, replaced)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    inject.hit("save.before_latest", step)
    atomic_write_text(final.parent / LATEST, final.name)
    inject.hit("save.after_latest", step)
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    return final
