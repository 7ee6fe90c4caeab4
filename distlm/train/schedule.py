"""Learning-rate schedule: linear warmup, then cosine or linear decay to ``min_lr``.

A pure function of the step, so resuming needs nothing but the step number.
"""

from __future__ import annotations

import math

from distlm.config import OptimConfig


def learning_rate(step: int, optim: OptimConfig, max_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (0-based), as in nanoGPT's get_lr."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / (optim.warmup_steps + 1)
    if optim.decay == "constant":
        return optim.lr
    decay_steps = optim.decay_steps or max_steps
    if step >= decay_steps:
        return optim.min_lr
    progress = (step - optim.warmup_steps) / max(1, decay_steps - optim.warmup_steps)
    if optim.decay == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        coeff = 1.0 - progress
    return optim.min_lr + coeff * (optim.lr - optim.min_lr)
