"""One optimizer step: forward and backward over the micro-batches, then the update.

Two engines: DeepSpeed's plain engine (pp = 1), driven micro-batch by micro-batch here, and
its pipeline engine (pp > 1), which runs the whole 1F1B schedule of a step in ``train_batch``.
Both see the same micro-batches with the same loss weights, so both compute the same step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from distlm.fault import inject
from distlm.fault.bad_steps import StepGuard
from distlm.train.engine import global_grad_norm


@dataclass
class StepResult:
    loss: torch.Tensor      # mean loss over this rank's micro-batches, still on the device
    grad_norm: float        # before clipping; NaN when not asked for
    skipped: Optional[str]  # why the update was not applied (bad_steps.NONFINITE / SPIKE), or None


def train_step(engine, micro_batches: list, device: torch.device, want_grad_norm: bool,
               guard: Optional[StepGuard] = None, inject_step: int = 0) -> StepResult:
    """DeepSpeed scales each micro-batch's loss by 1/accumulation, clips and steps on the last one.

    Rows the loader skipped as damaged (targets all -100) carry no weight: each micro-batch's
    mean loss is weighted by its share of this rank's valid tokens, which is 1 when none is
    skipped, so the step is the mean over the valid tokens and not a mean of micro-batch means.
    ``guard`` may veto the update (NaN/Inf, a loss spike). ``inject_step``: the step's number
    (from 1) for fault injection, which may make this rank's loss NaN or spike.
    """
    factor = inject.loss_factor(inject_step)  # once per step: it fires once per step number
    weights = [w * factor for w in valid_token_weights(micro_batches)]
    guard = guard or StepGuard(spike_factor=0, spike_window=1)  # not attached: vetoes nothing
    guard.begin_step()
    if is_pipeline(engine):
        loss = engine.train_batch(data_iter=pipeline_feed(micro_batches, weights, device))
    else:
        losses = []
        for i, ((tokens, targets, *_), weight) in enumerate(zip(micro_batches, weights)):
            tokens = tokens.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            mb_loss = engine(tokens, targets)
            engine.backward(mb_loss * weight if weight != 1.0 else mb_loss)
            inject.hit("backward", inject_step)  # fault tests: a signal in the middle of a step
            losses.append(mb_loss.detach() * weight)
            if i == len(micro_batches) - 1:  # the step below applies the update: the guard sees the loss
                step_loss = torch.stack(losses).float().mean()
                guard.local_loss = lambda: step_loss
            engine.step()
        loss = torch.stack(losses).float().mean()
    skipped = guard.end_step()
    grad_norm = global_grad_norm(engine) if want_grad_norm else float("nan")  # a host sync: logged steps only
    return StepResult(loss=loss.float(), grad_norm=grad_norm, skipped=skipped)


def is_pipeline(engine) -> bool:
    return hasattr(engine, "train_batch")  # only DeepSpeed's PipelineEngine has it


def pipeline_feed(micro_batches: list, weights: list[float], device: torch.device):
    """What DeepSpeed's pipeline engine reads: (inputs, (targets, loss weight)) per micro-batch.

    The weight rides with the labels to the last stage, where ``PipelineLoss`` applies it.
    """
    for (tokens, targets, *_), weight in zip(micro_batches, weights):
        yield (tokens.to(device, non_blocking=True),
               (targets.to(device, non_blocking=True), torch.tensor(weight, dtype=torch.float32, device=device)))


def valid_token_weights(micro_batches: list) -> list[float]:
    """``n * valid_i / sum(valid)`` per micro-batch, from the rows the loader reports skipped."""
    valid = [(len(b[1]) - ((b[2] or {}).get("rows_skipped", 0) if len(b) > 2 else 0)) for b in micro_batches]
    total = sum(valid)
    if total == len(micro_batches) * len(micro_batches[0][1]):
        return [1.0] * len(micro_batches)
    return [len(micro_batches) * v / max(total, 1) for v in valid]
