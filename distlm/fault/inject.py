"""Deterministic fault injection: kill or fail one rank at one named point of the run.

Tests set ``DISTLM_FAULT`` in the environment of a real run, e.g.::

    DISTLM_FAULT="rank=1,step=6,phase=save.write,offset=40000,signal=KILL"

and the rank named sends itself the signal when the run reaches that point: after the
optimizer step ``step`` (``phase=step``), or at a point of the checkpoint of step ``step``
(``save.write`` once ``offset`` bytes of that save are on disk; ``save.before_manifest``,
``save.before_rename``, ``save.before_latest``, ``save.after_latest`` on the committing
rank). ``signal=ENOSPC`` instead makes the write at ``offset`` fail with "No space left on
device". A hook that does not match costs one comparison; without the variable, nothing.

For the fault-tolerance tests (preemption, hangs, bad steps, crash loops):

- ``phase=fetch`` fires before the step's batches are fetched (a signal during a loader fetch);
  ``children=1`` sends the signal to the rank's loader workers too. ``phase=backward`` fires
  after the step's first backward pass (mid-step; not on pipeline engines).
- ``signal=STOP`` freezes the rank (a hang); ``signal=SKIP`` at ``phase=agree`` makes the rank
  skip the step boundary's collective; ``count=2`` sends the signal twice (a double SIGTERM).
- ``phase=loss`` with ``signal=NAN`` or ``signal=SPIKE`` makes the rank's loss NaN or ten
  times larger for ``repeat`` steps from ``step`` on.
- ``restart=N`` fires only in the launcher's N-th restart (torchrun's TORCHELASTIC_RESTART_COUNT),
  so a restarted job does not meet the same fault; without it the fault fires in every start
  (a deterministic crash).

Faults are chosen by a seeded generator in the test (which logs the seed), never by sleeps.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

ENV = "DISTLM_FAULT"
DELAY_S = 0.2
PHASES = ("step", "fetch", "backward", "agree", "loss", "save.write", "save.before_manifest", "save.before_rename",
          "save.before_latest", "save.after_latest")
SPIKE_FACTOR = 10.0
REPEAT_GAP_S = 0.3  # between the signals of count=2 (tests set fault.repeat_signal_s below it)


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    phase: str
    offset: int = 0
    signal: str = "KILL"
    count: int = 1                  # signals sent per hit
    repeat: int = 1                 # consecutive steps the fault fires on
    restart: Optional[int] = None   # only in this restart of the launcher (None: every start)
    children: bool = False          # the rank's child processes (loader workers) get the signal too

    def to_env(self) -> str:
        text = f"rank={self.rank},step={self.step},phase={self.phase},offset={self.offset},signal={self.signal}"
        text += f",count={self.count},repeat={self.repeat},children={int(self.children)}"
        return text + (f",restart={self.restart}" if self.restart is not None else "")

    @classmethod
    def parse(cls, text: str) -> "Fault":
        fields = dict(item.split("=", 1) for item in text.split(",") if item)
        fault = cls(rank=int(fields["rank"]), step=int(fields["step"]), phase=fields["phase"],
                    offset=int(fields.get("offset", 0)), signal=fields.get("signal", "KILL"),
                    count=int(fields.get("count", 1)), repeat=int(fields.get("repeat", 1)),
                    restart=int(fields["restart"]) if "restart" in fields else None,
                    children=fields.get("children", "0") == "1")
        if fault.phase not in PHASES:
            raise ValueError(f"{ENV}: unknown phase {fault.phase!r}; one of {', '.join(PHASES)}")
        return fault


def _planned() -> list[Fault]:
    """This rank's faults in this start (``DISTLM_FAULT`` may list several, separated by ';')."""
    text = os.environ.get(ENV)
    if not text:
        return []
    own_rank = int(os.environ.get("RANK", "0"))
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    faults = [Fault.parse(part) for part in text.split(";") if part.strip()]
    return [f for f in faults if f.rank == own_rank and (f.restart is None or f.restart == restart)]


_FAULTS = _planned()


def planned_offset(phase: str, step: int) -> Optional[int]:
    """The byte offset a planned fault of ``phase`` at ``step`` fires at (writers cut their chunks there)."""
    fault = _due(phase, step)
    return fault.offset if fault is not None else None


def _due(phase: str, step: int) -> Optional[Fault]:
    for fault in _FAULTS:
        if fault.phase == phase and fault.step <= step < fault.step + fault.repeat:
            return fault
    return None


_LOSS_FIRED: set[int] = set()
_SIGNALLED: set[tuple[str, int]] = set()


def loss_factor(step: int) -> float:
    """What this rank's loss of optimizer step ``step`` (counted from 1) is multiplied by.

    Once per step number and process: like bad data, which a run that rolls back past it
    does not read again.
    """
    fault = _due("loss", step)
    if fault is None or step in _LOSS_FIRED:
        return 1.0
    _LOSS_FIRED.add(step)
    return float("nan") if fault.signal == "NAN" else SPIKE_FACTOR


def skips(phase: str, step: int) -> bool:
    """Whether this rank is to skip the collective at ``phase`` of ``step`` (``signal=SKIP``)."""
    fault = _due(phase, step)
    return fault is not None and fault.signal == "SKIP"


def hit(phase: str, step: int, offset: Optional[int] = None) -> None:
    """Fire the planned fault if this is its point; ``offset``: bytes of this save written so far."""
    fault = _due(phase, step)
    if fault is None or fault.signal == "SKIP":
        return
    if offset is not None and offset < fault.offset:
        return
    if fault.signal == "DELAY":
        time.sleep(DELAY_S)
        return
    if fault.signal == "ENOSPC":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    if (phase, step) in _SIGNALLED:  # a save's later writes pass the offset too: one signal per point
        return
    _SIGNALLED.add((phase, step))
    sig = getattr(signal, f"SIG{fault.signal}")
    targets = _children() if fault.children else []
    print(f"fault injection: rank {fault.rank} sends SIG{fault.signal} x{fault.count} at {phase} of step {step} "
          f"(time {time.time():.3f})", file=sys.stderr, flush=True)
    for _ in range(fault.count):
        if targets:  # from another process, as a scheduler's signal comes (workers obey only their trainer)
            subprocess.run(["kill", f"-{fault.signal}", *map(str, targets)], check=False)
        os.kill(os.getpid(), sig)
        if fault.count > 1:
            time.sleep(REPEAT_GAP_S)  # two deliveries, not one coalesced pending signal


def _children() -> list[int]:
    """This process's child processes (Linux: /proc/self/task/*/children)."""
    pids = []
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
        except OSError:
            continue
    return pids
