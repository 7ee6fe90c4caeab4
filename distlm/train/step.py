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
    Rows the loader skipped as damaged (targets all -100) carry no weight: each micro-batch's
    mean loss is weighted by its share of this rank's valid tokens, which is 1 when none is
    skipped, so the step is the mean over the valid tokens and not a mean of micro-batch means.
    """
    weights = _valid_token_weights(micro_batches)
    losses = []
    norm = None
    for (tokens, targets, *_), weight in zip(micro_batches, weights):
        tokens = tokens.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        loss = engine(tokens, targets)
        engine.backward(loss * weight if weight != 1.0 else loss)
        if clip_here and engine.is_gradient_accumulation_boundary():
            norm = clip_gradients(engine.module, max_norm)
        engine.step()
        losses.append(loss.detach() * weight)
    grad_norm = float("nan")
    if want_grad_norm:  # a host sync: only on logged steps
        grad_norm = float(norm) if norm is not None else global_grad_norm(engine)
    return StepResult(loss=torch.stack(losses).float().mean(), grad_norm=grad_norm)


def _valid_token_weights(micro_batches: list) -> list[float]:
    """``n * valid_i / sum(valid)`` per micro-batch, from the rows the loader reports skipped."""
    valid = [(len(b[1]) - ((b[2] or {}).get("rows_skipped", 0) if len(b) > 2 else 0)) for b in micro_batches]
    total = sum(valid)
    if total == len(micro_batches) * len(micro_batches[0][1]):
        return [1.0] * len(micro_batches)
    return [len(micro_batches) * v / max(total, 1) for v in valid]
