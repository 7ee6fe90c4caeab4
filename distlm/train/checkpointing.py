"""The loop's side of checkpoints: which one to resume, and a Saver wired to this run's model."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from distlm.checkpoint.errors import CheckpointError
from distlm.checkpoint.saver import SaveOptions, Saver
from distlm.checkpoint.select import clean_leftovers, find_resume
from distlm.checkpoint.state import rng_state
from distlm.config import Config
from distlm.parallel.distributed import DistContext, all_gather_objects
from distlm.parallel.layout import ParallelGroups


def choose_resume(cfg: Config, ckpt_dir: Path, ctx: DistContext, log: Callable[[str], None]) -> Optional[Path]:
    """Rank 0 picks and verifies the checkpoint (hashing every file once), then tells the others.

    An error there is raised on every rank, so none is left waiting for the others. Leftovers
    of interrupted saves are removed after the choice, before this run saves anything.
    """
    choice, error = None, None
    if ctx.is_main:
        try:
            choice = find_resume(cfg.train.resume, ckpt_dir, cfg.checkpoint.verify, cfg.checkpoint.on_damaged, log)
            clean_leftovers(ckpt_dir, log)
        except CheckpointError as e:
            error = str(e)
    choice, error = all_gather_objects((choice, error))[0]
    if error is not None:
        raise CheckpointError(error)
    return choice


def canonical_params(model, cfg: Config, groups: ParallelGroups) -> list:
    """(name in the one-process Transformer, parameter) for this rank's parameters."""
    if groups.layout.pp == 1:
        return list(model.named_parameters())
    from distlm.model.pipeline import canonical_name

    return [(canonical_name(n, cfg.model.n_layers), p) for n, p in model.named_parameters()]


def make_saver(engine, model, cfg: Config, groups: ParallelGroups, ctx: DistContext, ckpt_dir: Path, tp_rng,
               log: Callable[[str], None]) -> Saver:
    from distlm.checkpoint.consolidate import shard_payloads

    named = canonical_params(model, cfg, groups)
    c, layout = groups.coords, groups.layout

    def model_files() -> dict:
        # A collective over the data-parallel group: the fp32 masters are assembled from ZeRO partitions.
        return shard_payloads(named, engine.optimizer, c.stage, c.tp_rank, layout.tp, layout.pp,
                              writes=c.dp_rank == 0)

    def rng_files() -> dict:
        return {**rng_state(), **({"tp": tp_rng.state_dict()} if tp_rng is not None else {})}

    options = SaveOptions(async_save=cfg.checkpoint.async_save, on_error=cfg.checkpoint.on_error,
                          keep_last=cfg.checkpoint.keep_last, keep_every=cfg.checkpoint.keep_every)
    described = {"tp": layout.tp, "pp": layout.pp, "dp": layout.dp, "world_size": ctx.world_size,
                 "zero_stage": cfg.parallel.zero_stage}
    return Saver(engine, ckpt_dir, ctx, options, described, model_files, rng_files, log)
