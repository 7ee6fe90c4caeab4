"""One optimizer step: forward and backward over the micro-batches, then the update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distlm.train.engine import clip_gradients, global_grad_norm


@dataclass
class StepResult:
    loss: torch.Tensor   # mean loss over this rank's micro-batches, still on the device
    grad_norm: float     # before clipping; NaN when not asked for


def train_step(engine, micro_batches: list, device: torch.device, clip_here: bool, max_norm: float,
               want_grad_norm: bool) -> StepResult:
    """DeepSpeed scales each micro-batch's loss by 1/accumulation and steps on the last one.

    ``clip_here``: clip (and measure) the gradients here, after DeepSpeed averaged them and
    before its optimizer step (see ``engine.distlm_clips``); otherwise DeepSpeed clips.
    """
    losses = []
    norm = None
    for tokens, targets, *_ in micro_batches:
        tokens = tokens.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        loss = engine(tokens, targets)
        engine.backward(loss)
        if clip_here and engine.is_gradient_accumulation_boundary():
            norm = clip_gradients(engine.module, max_norm)
        engine.step()
        losses.append(loss.detach())
    grad_norm = float("nan")
    if want_grad_norm:  # a host sync: only on logged steps
        grad_norm = float(norm) if norm is not None else global_grad_norm(engine)
    return StepResult(loss=torch.stack(losses).float().mean(), grad_norm=grad_norm)
