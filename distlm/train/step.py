"""One optimizer step: forward and backward over the micro-batches, then the update."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from distlm.train.engine import fp32_grad_norm, global_grad_norm


@dataclass
class StepResult:
    loss: torch.Tensor   # mean loss over this rank's micro-batches, still on the device
    grad_norm: float     # before clipping; NaN when not asked for


def train_step(engine, micro_batches: list, device: torch.device, want_grad_norm: bool) -> StepResult:
    """DeepSpeed scales each micro-batch's loss by 1/accumulation and steps on the last one."""
    losses = []
    grad_norm = float("nan")
    # Plain fp32 data parallel (ZeRO 0) does not record the norm; measure it ourselves,
    # and only when it will be logged, since it costs a pass over every gradient.
    measure_here = want_grad_norm and engine.zero_optimization_stage() == 0 and not engine.bfloat16_enabled()
    for tokens, targets in micro_batches:
        tokens = tokens.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        loss = engine(tokens, targets)
        engine.backward(loss)
        if measure_here and engine.is_gradient_accumulation_boundary():
            grad_norm = fp32_grad_norm(engine.module)
        engine.step()
        losses.append(loss.detach())
    if want_grad_norm and not measure_here:
        grad_norm = global_grad_norm(engine)
    return StepResult(loss=torch.stack(losses).float().mean(), grad_norm=grad_norm)
