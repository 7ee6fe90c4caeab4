"""Progress of a ``distlm prepare`` phase: a bar on a terminal, log lines elsewhere."""

from __future__ import annotations

import sys
import time
from typing import Optional

from tqdm import tqdm

from .prepare_common import Log


class Progress:
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
