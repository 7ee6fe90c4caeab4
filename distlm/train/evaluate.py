"""Validation loss over ``train.eval_iters`` global batches of the held-out split.

Defined in global rows, like training: ``eval_iters x train.batch_size`` sequences from the
start of the validation split, split over the data-parallel ranks and micro-batches. So the
same weights give the same validation loss whatever the process count or accumulation.
"""

from __future__ import annotations

from typing import Optional

import torch

from distlm.config import BatchLayout, Config
from distlm.parallel.distributed import DistContext, all_reduce_sum
from distlm.parallel.layout import ParallelGroups
from distlm.train.data import DataCounters, align_skipped_rows, val_stream
from distlm.train.step import is_pipeline, pipeline_feed, valid_token_weights


@torch.no_grad()
def evaluate(engine, cfg: Config, batch: BatchLayout, ctx: DistContext, groups: ParallelGroups,
             split: str = "val", data_errors: Optional[DataCounters] = None) -> tuple[float, int]:
    """Return (mean validation loss, global batches). Always the same rows, in file order.

    The mean is over the rows read, all ranks together; rows skipped as damaged (with
    data.on_error=skip) count for nothing, and are reported to ``data_errors``. (With a
    pipeline, see ``_evaluate_pipeline``.)
    """
    stream = val_stream(cfg, batch, groups.coords.dp_rank, split)
    align = cfg.data.on_error == "skip" and groups.replica_group is not None
    if is_pipeline(engine):
        return _evaluate_pipeline(engine, cfg, batch, ctx, stream, data_errors, groups if align else None), \
            cfg.train.eval_iters
    micro_batches = cfg.train.eval_iters * batch.grad_accum
    engine.eval()
    # [sum of per-row losses, rows]: a micro-batch's mean loss times its valid rows.
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    batches = iter(stream)
    for _ in range(micro_batches):
        micro = next(batches)
        if align:  # the tp ranks of a replica must see the same rows
            (micro,) = align_skipped_rows([micro], groups.replica_group, ctx.device)
        tokens, targets, errors = micro
        if data_errors is not None:
            data_errors.add(errors)
        rows = len(targets) - (errors or {}).get("rows_skipped", 0)
        loss = engine(tokens.to(ctx.device), targets.to(ctx.device)).double()
        total += torch.stack([loss * rows, torch.tensor(float(rows), dtype=torch.float64, device=ctx.device)])
    engine.train()
    # With tensor parallelism every rank of a replica holds the replica's loss: the tp copies
    # cancel in the ratio.
    loss_sum, rows = all_reduce_sum(total).tolist()
    return loss_sum / max(rows, 1.0), cfg.train.eval_iters


def _evaluate_pipeline(engine, cfg: Config, layout: BatchLayout, ctx: DistContext, stream,
                       data_errors: Optional[DataCounters], align_over: Optional[ParallelGroups]) -> float:
    """The pipeline engine evaluates a global batch per call and returns its mean, on every rank.

    Within a batch each micro-batch's loss is weighted by its valid rows, as in training; the
    dp ranks' means and the batches count equally. Without damaged rows that is the same
    mean over all rows as the one-process evaluation; with skipped rows it weighs rows slightly
    differently.
    """
    batches = iter(stream)
    losses = []
    for _ in range(cfg.train.eval_iters):
        micro_batches = [next(batches) for _ in range(layout.grad_accum)]
        if align_over is not None:
            micro_batches = align_skipped_rows(micro_batches, align_over.replica_group, ctx.device)
        if data_errors is not None:
            for micro in micro_batches:
                data_errors.add(micro.errors)
        feed = pipeline_feed(micro_batches, valid_token_weights(micro_batches), ctx.device)
        losses.append(float(engine.eval_batch(feed, num_micro_batches=layout.grad_accum)))
    return sum(losses) / len(losses)
