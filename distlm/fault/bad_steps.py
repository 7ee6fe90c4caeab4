"""Bad steps: an update whose gradient is NaN/Inf, or whose loss spikes, is skipped on every rank.

Where the decision is made: inside the optimizer's ``step``, which every DeepSpeed path
(plain, bf16, ZeRO 1-3, the pipeline engine) calls once the gradients are reduced and the
global gradient norm is known. Skipping there leaves weights *and* optimizer moments as they
were; the step counter, the data and the LR schedule move on (as in Megatron), so a resumed
run stays exact.

Why every rank agrees without extra messages:

- NaN/Inf: the global gradient norm is reduced over all ranks, so it is the same everywhere.
  DeepSpeed's mixed-precision and ZeRO optimizers already skip such a step (their
  "overflow"); the guard sees that its ``step`` was not called and counts it. Plain fp32
  without ZeRO has no such check: there the guard reads the norm distlm's clipping hook
  recorded and vetoes the update itself.
- Spikes: the guard all-reduces this step's loss (one two-number all-reduce per step, only
  when ``fault.spike_factor`` is set) and compares it with the rolling mean of the last
  ``fault.spike_window`` good steps, a window that every rank holds identically and that is
  saved in the checkpoint.

A NaN loss on one rank is therefore skipped by all: its gradient poisons the reduced norm.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from distlm.fault import exit_codes
from distlm.fault.exit_codes import RunEnded

NONFINITE = "nonfinite"
SPIKE = "spike"


class BadStepError(RunEnded):
    """``fault.max_bad_steps_in_row`` updates in a row were skipped."""

    code = exit_codes.BAD_STEPS


class StepGuard:
    """Vetoes bad updates from inside the optimizer's ``step``; counts what it skipped.

    ``state`` is the checkpointed part (``TrainState.bad_steps``): the loss window, the
    current run of bad steps, totals per reason and rollbacks.
    """

    def __init__(self, spike_factor: float, spike_window: int, state: Optional[dict] = None):
        self.spike_factor = spike_factor
        self.spike_window = spike_window
        self.state = {"window": [], "in_row": 0, "skipped": {}, "rollbacks": 0, **(state or {})}
        # Filled in once the engine exists: this rank's loss of the step (None on pipeline
        # stages that do not hold it), and the norm to check where DeepSpeed checks none.
        self.local_loss: Callable[[], Optional[torch.Tensor]] = lambda: None
        self.grad_norm: Optional[Callable[[], Optional[torch.Tensor]]] = None
        self.step_loss: Optional[float] = None
        self._decided = False
        self._veto: Optional[str] = None
        self._optimizer_stepped = False
        self._attached = False

    # ---------------------------------------------------------------- wiring

    def attach(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        """Route ``optimizer.step`` through the guard (DeepSpeed calls the instance's ``step``)."""
        unguarded = optimizer.step

        def guarded_step(*args, **kwargs):
            self._optimizer_stepped = True
            if self.veto() is None:
                return unguarded(*args, **kwargs)
            return None

        optimizer.step = guarded_step
        self._attached = True
        return optimizer

    # ---------------------------------------------------------------- per step

    def begin_step(self) -> None:
        self._decided, self._veto, self._optimizer_stepped, self.step_loss = False, None, False, None

    def veto(self) -> Optional[str]:
        """Why this step's update must not be applied, or None; decided once per step.

        ZeRO-3 calls the optimizer once per parameter sub-group: the first call decides and
        the others follow, so the all-reduce below happens once per step on every rank.
        """
        if not self._decided:
            self._decided, self._veto = True, self._decide()
        return self._veto

    def _decide(self) -> Optional[str]:
        if self.grad_norm is not None:
            norm = self.grad_norm()
            if norm is not None and not math.isfinite(float(norm)):
                return NONFINITE
        if self.spike_factor <= 0:
            return None
        self.step_loss = _global_mean(self.local_loss())
        if not math.isfinite(self.step_loss):
            return NONFINITE
        return SPIKE if self.is_spike(self.step_loss) else None

    def is_spike(self, loss: float) -> bool:
        window = self.state["window"]
        return len(window) >= self.spike_window and loss > self.spike_factor * (sum(window) / len(window))

    def end_step(self) -> Optional[str]:
        """After the engine's step: why it was skipped (None: applied); updates the counters."""
        if self._decided:
            reason = self._veto
        else:  # DeepSpeed's own overflow check skipped it before calling the optimizer
            reason = None if self._optimizer_stepped or not self._attached else NONFINITE
        if reason is None:
            self.state["in_row"] = 0
            if self.step_loss is not None:
                self.state["window"] = (self.state["window"] + [self.step_loss])[-self.spike_window:]
            return None
        self.state["in_row"] += 1
        self.state["skipped"][reason] = self.state["skipped"].get(reason, 0) + 1
        return reason

    # ---------------------------------------------------------------- reporting

    @property
    def in_row(self) -> int:
        return self.state["in_row"]

    @property
    def skipped_total(self) -> int:
        return sum(self.state["skipped"].values())

    def describe(self, reason: str) -> str:
        if reason == SPIKE:
            window = self.state["window"]
            return (f"loss {self.step_loss:.4f} is over {self.spike_factor:g}x the mean "
                    f"{sum(window) / len(window):.4f} of the last {len(window)} steps")
        return "the loss or the gradient is NaN/Inf"


def _global_mean(local: Optional[torch.Tensor]) -> float:
    """The mean of the ranks' losses (ranks without one, e.g. early pipeline stages, add nothing)."""
    value = local.detach().float().reshape(()) if local is not None else None
    device = value.device if value is not None else _default_device()
    pair = torch.stack([value if value is not None else torch.zeros((), device=device),
                        torch.tensor(1.0 if value is not None else 0.0, device=device)])
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(pair)
    total, count = pair.tolist()
    return total / count if count else float("nan")


def _default_device() -> torch.device:
    if torch.cuda.is_available() and torch.distributed.is_initialized() and \
            torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
