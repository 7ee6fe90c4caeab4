"""What rank 0 shows: one log line per interval, and ``RUN_DIR/metrics.jsonl``.

The log line is plain text (colour only on a terminal), never a progress bar, so SLURM logs
stay readable. metrics.jsonl holds one JSON object per logged step and per evaluation.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import TextIO

from distlm.fsutil import atomic_write_text


def _fmt_count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_step_line(row: dict, max_steps: int, colour: bool = False) -> str:
    """``step 120/10000 | loss 3.412 | lr 3.0e-04 | grad 0.91 | 312 ms | 1.05M tok/s | mfu 41.2% | data 1.3% | mem 1.2 GiB``"""
    parts = [
        f"step {row['step']}/{max_steps}",
        f"loss {row['loss']:.4f}",
        f"lr {row['lr']:.1e}",
        f"grad {row['grad_norm']:.2f}",
        f"{row['ms_per_step']:.0f} ms",
        f"{_fmt_count(row['tokens_per_s'])} tok/s",
    ]
    if row.get("mfu") is not None:
        parts.append(f"mfu {100 * row['mfu']:.1f}%")
    parts.append(f"data {100 * row['data_wait']:.1f}%")
    if row.get("data_errors"):
        errors = row["data_errors"]
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(errors.items()) if k != "rows_skipped")
        parts.append(f"bad data: {errors.get('rows_skipped', 0)} rows skipped ({kinds})")
    if row.get("skipped_steps"):
        skipped = row["skipped_steps"]
        parts.append(f"skipped {sum(skipped.values())} (" + ", ".join(f"{k} {n}" for k, n in sorted(skipped.items())) + ")")
    if row.get("mem_bytes"):
        parts.append(f"mem {row['mem_bytes'] / 2**30:.1f} GiB")
    line = " | ".join(parts)
    if colour:
        line = "\033[1m" + parts[0] + "\033[0m" + line[len(parts[0]):]
    return line


def format_eval_line(row: dict, max_steps: int) -> str:
    ppl = math.exp(row["val_loss"]) if row["val_loss"] < 50 else float("inf")
    return f"eval {row['step']}/{max_steps} | val_loss {row['val_loss']:.4f} | ppl {ppl:.2f} | {row['val_batches']} batches"


class RunLog:
    """Rank 0's writer for the log lines and metrics.jsonl (other ranks get a silent one)."""

    def __init__(self, run_dir: str | os.PathLike, max_steps: int, enabled: bool = True,
                 stream: TextIO = sys.stdout):
        self.path = Path(run_dir) / "metrics.jsonl"
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_steps = max_steps
        self.enabled = enabled
        self.stream = stream
        self.colour = enabled and stream.isatty() and "NO_COLOR" not in os.environ

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def step(self, row: dict) -> None:
        if self.enabled:
            self._append(row)
            self.info(format_step_line(row, self.max_steps, self.colour))

    def eval(self, row: dict) -> None:
        if self.enabled:
            self._append(row)
            self.info(format_eval_line(row, self.max_steps))

    def truncate_after(self, step: int) -> int:
        """On resume: drop rows of steps after ``step`` (work the crash undid); return how many."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, dropped = [], 0
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line torn by the crash
                    dropped += 1
                    continue
                if row.get("step", 0) > step:
                    dropped += 1
                else:
                    kept.append(line if line.endswith("\n") else line + "\n")
        if dropped:
            atomic_write_text(self.path, "".join(kept))
        return dropped

    def start_fresh(self) -> str | None:
        """A run with nothing to resume: keep an older metrics.jsonl aside; return its new name."""
        if not self.enabled or not self.path.exists():
            return None
        n = 1
        while self.path.with_name(f"metrics.{n}.jsonl").exists():
            n += 1
        kept = self.path.with_name(f"metrics.{n}.jsonl")
        os.replace(self.path, kept)
        return kept.name

    def _append(self, row: dict) -> None:
        # NaN and Infinity are not JSON: write null so every line stays parseable.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean, allow_nan=False) + "\n")
