"""Crash loops: a run that fails the same way after every restart must stop asking for restarts.

A launcher with restarts (torchrun --max-restarts, a SLURM requeue) would otherwise burn its
whole allocation re-running the same crash. Every start appends one line to
``RUN_DIR/starts.jsonl`` (rank 0): the checkpoint step it resumed from and, when it ends in a
known way, how it ended. A start that resumes from the same step as the last
``fault.max_restarts_without_progress`` starts, none of which finished or saved a newer
checkpoint, is refused with ``exit_codes.CRASH_LOOP`` ("do not requeue").

Only a new checkpoint counts as progress: steps trained and lost again do not.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

from distlm.fault import exit_codes
from distlm.fsutil import atomic_write_text
from distlm.fault.exit_codes import RunEnded

STARTS_FILE = "starts.jsonl"
ENDINGS_THAT_RESET = ("finished", "preempted")  # the run did what it was asked; not a crash


class CrashLoopError(RunEnded):
    """This start would repeat a crash: the message says which starts and what to do."""

    code = exit_codes.CRASH_LOOP


def restart_count_from_env() -> int:
    """The launcher's restart number, where it says (torchrun: TORCHELASTIC_RESTART_COUNT)."""
    for name in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 0


class StartLog:
    """``RUN_DIR/starts.jsonl``: one line per start of the run, written by rank 0 only."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / STARTS_FILE

    def starts(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        for line in self.path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a crash mid-write: that start counts as unknown
        return rows

    def failed_starts_at(self, resume_step: int) -> list[dict]:
        """The most recent starts, in a row, that resumed from ``resume_step`` and did not end well."""
        streak = []
        for row in reversed(self.starts()):
            if row.get("resume_step") != resume_step or row.get("ended") in ENDINGS_THAT_RESET:
                break
            streak.append(row)
        return streak

    def check(self, resume_step: int, limit: int) -> None:
        """Raise CrashLoopError if ``limit`` (> 0) starts in a row already failed from ``resume_step``."""
        if limit <= 0:
            return
        streak = self.failed_starts_at(resume_step)
        if len(streak) >= limit:
            raise CrashLoopError(
                f"the last {len(streak)} starts of this run all resumed from step {resume_step} and failed before "
                f"saving a newer checkpoint (fault.max_restarts_without_progress={limit}; see {self.path}). "
                f"Restarting again would repeat the crash: read the first failed start's log, fix the cause, "
                f"then start again (or remove {self.path.name} to reset the count)")

    def record_start(self, resume_step: int) -> None:
        self._append({"event": "start", "resume_step": resume_step, "restart": restart_count_from_env(),
                      "time": time.time(), "pid": os.getpid()})

    def record_end(self, ended: str, step: Optional[int]) -> None:
        """Mark this process's start with its ending ("finished", "preempted", or an exit code's name).

        Found by pid: a start that failed before recording itself must not overwrite the
        ending of the start before it.
        """
        rows = self.starts()
        own = [row for row in rows if row.get("pid") == os.getpid()]
        if not own:
            return
        own[-1].update(ended=ended, end_step=step)
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in rows))

    def _append(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
