"""The loop's side of checkpoints: which one to resume, and a Saver wired to this run's model."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Optional

from distlm.checkpoint.errors import CheckpointError
from distlm.checkpoint.saver import SaveOptions, Saver
from distlm.checkpoint.manifest import ManifestError
from distlm.checkpoint.commit import LATEST
from distlm.checkpoint.select import (candidates, check, choose, clean_leftovers, delete_checkpoint,
                                      refuse_fresh_start_over, step_folders, step_of)
from distlm.checkpoint.state import TrainState, check_compatible, load, rng_state
from distlm.config import Config, to_dict
from distlm.fsutil import atomic_write_text
from distlm.parallel.distributed import DistContext, all_gather_objects
from distlm.parallel.layout import ParallelGroups


def choose_resume(cfg: Config, ckpt_dir: Path, ctx: DistContext, log: Callable[[str], None]) -> Optional[Path]:
    """The verified checkpoint to continue from (None: a fresh start), agreed by every rank.

    Rank 0 lists the candidates; all ranks hash a share of each candidate's files (a large
    checkpoint hashed by one rank would outlast the process group's timeout); rank 0 picks the
    first that verified everywhere, and removes leftovers of interrupted saves. Any error is
    raised on every rank, so none is left waiting in a collective.
    """
    resume, hashes = cfg.train.resume, cfg.checkpoint.verify == "hash"
    listed = _on_main(ctx, lambda: _listed(resume, ckpt_dir, log))
    tried = []
    for folder in listed:
        try:
            check(folder, hashes, share=(ctx.rank, ctx.world_size))
            mine = None
        except ManifestError as e:
            mine = str(e)
        except Exception as e:  # anything else unexpected still fails the candidate, on every rank
            mine = f"{folder}: {type(e).__name__}: {e}"
        errors = [error for error in all_gather_objects(mine) if error]
        tried.append((folder, errors[0] if errors else None))
        if not errors or resume != "auto" or cfg.checkpoint.on_damaged == "fail":
            break

    def pick() -> Optional[Path]:
        choice = choose(resume, ckpt_dir, tried, cfg.checkpoint.on_damaged, log)
        clean_leftovers(ckpt_dir, log, keep=choice)
        return choice
    return _on_main(ctx, pick)


def rollback_target(cfg: Config, ckpt_dir: Path, before_step: int, ctx: DistContext,
                    log: Callable[[str], None]) -> Optional[Path]:
    """The newest verified checkpoint older than ``before_step`` (None: none), agreed by every rank.

    Rank 0 lists; every rank verifies its share (``choose_resume``); a damaged one is passed
    over for the next older. Rank 0 then retires the checkpoints from ``before_step`` on (saved
    during a bad streak: a crash must not resume from them) and points ``latest`` at the target.
    """
    def older() -> list[Path]:
        return [p for p in reversed(step_folders(ckpt_dir)) if step_of(p) < before_step]

    for folder in _on_main(ctx, older):
        pinned = copy.deepcopy(cfg)
        pinned.train.resume = str(folder)
        try:
            target = choose_resume(pinned, ckpt_dir, ctx, log)
        except CheckpointError as e:  # raised on every rank alike
            log(f"rollback: {folder.name} cannot be used ({e}); trying an older one")
            continue

        def retire_newer() -> None:
            for newer in step_folders(ckpt_dir):
                if step_of(newer) >= before_step:
                    delete_checkpoint(newer)
            atomic_write_text(ckpt_dir / LATEST, target.name)
        _on_main(ctx, retire_newer)
        return target
    log(f"rollback: no usable checkpoint from before step {before_step}")
    return None


def _listed(resume: str, ckpt_dir: Path, log: Callable[[str], None]) -> list[Path]:
    if resume == "never":
        refuse_fresh_start_over(ckpt_dir)
    return candidates(resume, ckpt_dir, log)


def _on_main(ctx: DistContext, work: Callable[[], Any]) -> Any:
    """``work()`` on rank 0, its result (or its error, raised) on every rank."""
    result, error = None, None
    if ctx.is_main:
        try:
            result = work()
        except CheckpointError as e:
            error = str(e)
        except Exception as e:
            error = f"choosing the checkpoint to resume in {type(e).__name__}: {e}"
    result, error = all_gather_objects((result, error))[0]
    if error is not None:
        raise CheckpointError(error)
    return result


def resume(path: Path, engine, model, cfg: Config, groups: ParallelGroups, ctx: DistContext, saver: Saver, tp_rng,
           log: Callable[[str], None]) -> TrainState:
    """Check ``path`` fits this config, load it (resharding onto this layout if it differs)."""
    check_compatible(path, to_dict(cfg), log)
    state = load(engine, path, ctx, log, tp_rng=tp_rng, groups=groups, config=to_dict(cfg),
                 named_params=canonical_params(model, cfg, groups))
    saver.resumed(state)
    return state


def initialise_from(path: str, engine, model, cfg: Config, groups: ParallelGroups, ctx: DistContext,
                    log: Callable[[str], None]) -> Path:
    """Fine-tuning: this rank's weights from the checkpoint ``path`` (any layout), nothing else.

    Rank 0 finds and verifies the checkpoint (hashes); every rank then checks the pretrained
    model is this config's and writes the slices it holds where the engine keeps them (the fp32
    masters, so a bf16 run does not round the pretrained weights, and the working copy). The
    optimizer state, step and data position stay fresh.
    """
    from distlm.checkpoint.pretrained import resolve_checkpoint
    from distlm.checkpoint.reshard import load_weights

    folder = Path(_on_main(ctx, lambda: str(resolve_checkpoint(path, log))))
    differ = _model_keys_that_differ(folder, cfg)  # the same file on every rank: the same verdict
    if differ:
        raise CheckpointError(f"train.init_from={folder}: the pretrained model is not this config's model: "
                              f"{'; '.join(differ)}. Fine-tuning keeps the model; only model.objective, "
                              f"model.mask_prob, model.dropout and model.init_std may change")
    count = load_weights(canonical_params(model, cfg, groups), groups, folder, engine.optimizer)
    log(f"fine-tuning from {folder} (train.init_from): its weights loaded ({count} tensors on rank 0); the "
        f"optimizer, step and data position start fresh")
    return folder


# Every model key but these must be the pretrained model's: the others change the function the
# weights compute (norm, positions, rope_theta, ...) even where the shapes agree.
_FREE_KEYS = {"objective", "mask_prob", "dropout", "init_std", "max_seq_len"}


def _model_keys_that_differ(folder: Path, cfg: Config) -> list[str]:
    """``model.KEY=saved (this config: mine)`` for each key of ``cfg.model`` the checkpoint's differs in."""
    from distlm.checkpoint.pretrained import saved_config

    saved = saved_config(folder).get("model", {})
    mine = to_dict(cfg)["model"]
    keys = [k for k in mine if k not in _FREE_KEYS and k in saved and saved[k] != mine[k]]
    # Learned positions are a table of max_seq_len rows; computed ones (rope, sinusoidal) extend.
    if mine["pos"] == "learned" and saved.get("max_seq_len") != mine["max_seq_len"]:
        keys.append("max_seq_len")
    out = [f"model.{k}={saved.get(k)} (this config: {mine[k]})" for k in keys]
    if "vocab_size" in keys and saved.get("objective", "clm") != mine["objective"] == "mlm":
        out.append(f"masked LM adds a mask id where the tokenizer has none, so a causal model of "
                   f"{saved.get('vocab_size')} ids cannot become one; pretrain with model.objective=mlm, or "
                   f"prepare the data with a tokenizer that has a mask token (distlm tokenizer train)")
    return out


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
