"""Validation loss over ``train.eval_iters`` batches of the held-out split, averaged over ranks."""

from __future__ import annotations

import torch

from distlm.config import BatchLayout, Config
from distlm.data import TokenStream
from distlm.parallel.distributed import DistContext, all_reduce_mean


@torch.no_grad()
def evaluate(engine, cfg: Config, layout: BatchLayout, ctx: DistContext, split: str = "val") -> tuple[float, int]:
    """Return (mean validation loss, batches per rank). Always the same rows, in file order."""
    stream = TokenStream(cfg.data.path, split, micro_batch_size=layout.micro_batch_size,
                         dp_rank=ctx.rank, dp_size=layout.dp, seed=cfg.data.seed, shuffle=False,
                         seq_len=cfg.train.seq_len)
    engine.eval()
    total = torch.zeros((), dtype=torch.float64, device=ctx.device)
    batches = iter(stream)
    for _ in range(cfg.train.eval_iters):
        tokens, targets = next(batches)
        total += engine(tokens.to(ctx.device), targets.to(ctx.device)).double()
    engine.train()
    return all_reduce_mean(total / cfg.train.eval_iters).item(), cfg.train.eval_iters
