"""Deterministic fault injection: kill or fail one rank at one named point of the run.

Tests set ``DISTLM_FAULT`` in the environment of a real run, e.g.::

    DISTLM_FAULT="rank=1,step=6,phase=save.write,offset=40000,signal=KILL"

and the rank named sends itself the signal when the run reaches that point: after the
optimizer step ``step`` (``phase=step``), or at a point of the checkpoint of step ``step``
(``save.write`` once ``offset`` bytes of that save are on disk; ``save.before_manifest``,
``save.before_rename``, ``save.before_latest``, ``save.after_latest`` on the committing
rank). ``signal=ENOSPC`` instead makes the write at ``offset`` fail with "No space left on
device". A hook that does not match costs one comparison; without the variable, nothing.

Faults are chosen by a seeded generator in the test (which logs the seed), never by sleeps.
"""

from __future__ import annotations

import errno
import os
import signal
import time
from dataclasses import dataclass
from typing import Optional

ENV = "DISTLM_FAULT"
DELAY_S = 0.2
PHASES = ("step", "save.write", "save.before_manifest", "save.before_rename", "save.before_latest",
          "save.after_latest")


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    phase: str
    offset: int = 0
    signal: str = "KILL"

    def to_env(self) -> str:
        return f"rank={self.rank},step={self.step},phase={self.phase},offset={self.offset},signal={self.signal}"

    @classmethod
    def parse(cls, text: str) -> "Fault":
        fields = dict(item.split("=", 1) for item in text.split(",") if item)
        fault = cls(rank=int(fields["rank"]), step=int(fields["step"]), phase=fields["phase"],
                    offset=int(fields.get("offset", 0)), signal=fields.get("signal", "KILL"))
        if fault.phase not in PHASES:
            raise ValueError(f"{ENV}: unknown phase {fault.phase!r}; one of {', '.join(PHASES)}")
        return fault


def _planned() -> Optional[Fault]:
    text = os.environ.get(ENV)
    if not text:
        return None
    fault = Fault.parse(text)
    own_rank = int(os.environ.get("RANK", "0"))
    return fault if fault.rank == own_rank else None


_FAULT = _planned()


def planned_offset(phase: str, step: int) -> Optional[int]:
    """The byte offset a planned fault of ``phase`` at ``step`` fires at (writers cut their chunks there)."""
    fault = _FAULT
    return fault.offset if fault is not None and fault.phase == phase and fault.step == step else None


def hit(phase: str, step: int, offset: Optional[int] = None) -> None:
    """Fire the planned fault if this is its point; ``offset``: bytes of this save written so far."""
    fault = _FAULT
    if fault is None or fault.phase != phase or fault.step != step:
        return
    if offset is not None and offset < fault.offset:
        return
    if fault.signal == "DELAY":
        time.sleep(DELAY_S)
        return
    if fault.signal == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.kill(os.getpid(), getattr(signal, f"SIG{fault.signal}"))
