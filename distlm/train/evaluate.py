"""Validation loss over ``train.eval_iters`` global batches of the held-out split.

Defined in global rows, like training: ``eval_iters x train.batch_size`` sequences from the
start of the validation split, split over the data-parallel ranks and micro-batches. So the
same weights give the same validation loss whatever the process count or accumulation.
"""

from __future__ import annotations

import torch

from distlm.config import BatchLayout, Config
from distlm.parallel.distributed import DistContext, all_reduce_mean
from distlm.train.data import val_stream


@torch.no_grad()
def evaluate(engine, cfg: Config, layout: BatchLayout, ctx: DistContext, split: str = "val") -> tuple[float, int]:
    """Return (mean validation loss, global batches). Always the same rows, in file order."""
    stream = val_stream(cfg, layout, ctx.rank, split)
    micro_batches = cfg.train.eval_iters * layout.grad_accum
    engine.eval()
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    batches = iter(stream)
    for _ in range(micro_batches):
        tokens, targets, _ = next(batches)
        # Every micro-batch has the same number of tokens, so the mean of means is the mean.
        total += engine(tokens.to(ctx.device), targets.to(ctx.device)).double()
    engine.train()
    return all_reduce_mean(total / micro_batches).item(), cfg.train.eval_iters
