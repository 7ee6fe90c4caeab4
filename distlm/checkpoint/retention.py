"""Which checkpoints to delete: keep the newest K, every M-th step, and the protected ones."""

from __future__ import annotations

from typing import Iterable


def steps_to_delete(steps: Iterable[int], keep_last: int, keep_every: int, protect: Iterable[int]) -> list[int]:
    """``keep_last`` 0 keeps all; ``keep_every`` M keeps steps divisible by M (0: none extra).

    ``protect``: the step this run resumed from and the one just saved, never deleted whatever
    the counts say (deleting the checkpoint a run stands on would leave nothing if the new
    one turns out damaged).
    """
    ordered = sorted(set(steps))
    if keep_last <= 0:
        return []
    kept = set(ordered[-keep_last:]) | set(protect)
    if keep_every > 0:
        kept |= {s for s in ordered if s % keep_every == 0}
    return [s for s in ordered if s not in kept]
