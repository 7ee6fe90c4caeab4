"""distlm's own part of a checkpoint: the loop's state, every RNG, and loading it all back.

Layout of one checkpoint (format 3)::

    CKPT_DIR/latest                  a hint: the newest committed tag, e.g. "step-00000100"
    CKPT_DIR/step-00000100/          DeepSpeed's model / optimizer / ZeRO shards
        distlm-rank00000.pt          this rank's RNG states (python, numpy, torch, cuda, tp dropout)
        model-stage00-tp00.pt        the weights by canonical name, one file per (stage, tp rank)
        distlm.json                  step, data position, counters, config
        manifest.json                every file's size and SHA-256: the commit marker

Saving is :mod:`distlm.checkpoint.saver`, choosing what to resume :mod:`distlm.checkpoint.select`.
Everything is read through the manifest's hashes, and unpickled with ``weights_only=True``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from distlm.checkpoint import manifest as manifest_file
from distlm.checkpoint.errors import CheckpointError
from distlm.checkpoint.safe_load import load_bytes
from distlm.checkpoint.saver import STATE_FILE, rank_file
from distlm.parallel.distributed import DistContext


@dataclass
class TrainState:
    """What the loop needs, besides the engine, to continue exactly where it stopped."""

    step: int = 0               # optimizer steps completed
    rows_consumed: int = 0      # global training rows read (the data stream's position)
    tokens_seen: int = 0
    elapsed_s: float = 0.0      # training wall time before this process started
    data: dict = field(default_factory=dict)  # the loader's position per source (train/data.py)
    checkpoint_errors: int = 0  # saves that failed (a full disk, ...) over the whole run
    bad_steps: dict = field(default_factory=dict)  # skipped updates and the spike window (fault.bad_steps)


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # numpy's state holds an ndarray, which weights_only loading refuses: store plain ints.
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(state["python"][:1]) + (tuple(state["python"][1]),) + tuple(state["python"][2:]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# Keys whose change makes a checkpoint unusable (the weights would not fit) or the run not the
# one that was saved (the data order); the rest may change on resume. A different layout is
# loaded by resharding the layout-free model and optimizer files (distlm.checkpoint.reshard).
_MUST_MATCH = ("model.", "train.seq_len")
_RESHARD_KEYS = ("parallel.tp", "parallel.pp", "parallel.zero_stage", "parallel.pipeline_partition",
                 "train.precision")
_WARN_IF_CHANGED = ("data.path", "data.seed", "data.shuffle_blocks", "train.batch_size", "train.seed")


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "deepspeed":
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _decay_horizon(flat: dict) -> int:
    return flat.get("optim.decay_steps") or flat.get("train.max_steps")


def saved_record(path: Path, manifest: Optional[dict] = None) -> dict:
    """The checkpoint's ``distlm.json`` (step, state, config), read through the manifest's hash."""
    manifest = manifest or manifest_file.read(path)
    return json.loads(manifest_file.read_verified(path, STATE_FILE, manifest))


def check_compatible(path: Path, config: dict, log: Callable[[str], None] = print) -> None:
    """Refuse a checkpoint whose model or layout differs from the config; warn on data changes."""
    saved = _flatten(saved_record(path).get("config", {}))
    now = _flatten(config)
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    fatal = [k for k in changed if k.startswith(_MUST_MATCH)]
    if fatal:
        diffs = "; ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in fatal)
        raise CheckpointError(f"{path} was saved with a different model or layout ({diffs}); "
                              f"use the saved values, another run.dir, or train.resume=never")
    for key in changed:
        if key in _WARN_IF_CHANGED:
            log(f"WARNING: {key} changed since {path.name} ({saved.get(key)!r} -> {now.get(key)!r}): "
                f"the run continues, but not as the run that was saved")
    if _decay_horizon(saved) != _decay_horizon(now):
        log(f"WARNING: the learning-rate decay now ends at step {_decay_horizon(now)}, not "
            f"{_decay_horizon(saved)}: the LR jumps to the new schedule. To extend a run, set "
            f"optim.decay_steps explicitly from the start")


def layout_changes(record: dict, config: dict, world_size: int) -> list[str]:
    """What differs between the saved layout and this run's ("parallel.tp: 1 -> 2", ...)."""
    saved, now = _flatten(record.get("config", {})), _flatten(config)
    changes = [f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in _RESHARD_KEYS if saved.get(k) != now.get(k)]
    if record.get("world_size") != world_size:
        changes.append(f"world size: {record.get('world_size')} -> {world_size}")
    return changes


def load(engine, path: Path, ctx: DistContext, log: Callable[[str], None] = print, tp_rng=None,
         named_params=None, groups=None, config: Optional[dict] = None) -> TrainState:
    """Restore the engine and RNG on every rank; return the loop's state.

    On the layout that saved it, DeepSpeed loads its own files: ``engine.checkpoint_engine`` is
    distlm's (a :class:`~distlm.checkpoint.saver.Saver` installs it), so each is read only
    through the manifest's hash and unpickled with ``weights_only``. On another layout (tp, pp,
    ZeRO stage, precision or world size), the layout-free weights and Adam state are re-sliced
    for this rank's parameters (``named_params``: canonical name, parameter).
    """
    manifest = manifest_file.read(path)
    record = saved_record(path, manifest)
    changes = layout_changes(record, config, ctx.world_size) if config is not None else []
    if changes:
        _load_resharded(engine, path, manifest, changes, named_params, groups, log)
    else:
        io = engine.checkpoint_engine
        io.source = (path, manifest)
        try:
            load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                                  load_optimizer_states=True, load_lr_scheduler_states=False)
        finally:
            io.source = None
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path}")
    name = rank_file(ctx.rank)
    if not changes:
        # The same layout: each rank takes back its own streams (the run continues bit for bit).
        if name not in manifest["files"]:
            raise CheckpointError(f"{path} lacks {name} (rank {ctx.rank}'s random states): an incomplete "
                                  f"checkpoint; resume from another one")
        saved = load_bytes(manifest_file.read_verified(path, name, manifest), str(path / name))
        set_rng_state(saved)
        if tp_rng is not None and "tp" in saved:
            tp_rng.load_state_dict(saved["tp"])
    elif ctx.is_main:
        # Another layout: a rank's saved streams belong to a role it no longer has (and tensor-
        # parallel peers must share theirs), so the freshly seeded ones stay.
        log(f"NOTE: {path} was saved on another layout; random streams start afresh (data order is unaffected)")
    return TrainState(**record["state"])


def _load_resharded(engine, path: Path, manifest: dict, changes: list[str], named_params, groups,
                    log: Callable[[str], None]) -> None:
    from distlm.checkpoint.consolidate import optim_file
    from distlm.checkpoint.reshard import load_resharded

    if optim_file(0, 0) not in manifest["files"]:
        raise CheckpointError(f"{path} has no layout-free optimizer files, so it loads only on the layout that "
                              f"saved it ({'; '.join(changes)}); resume it there, or set train.resume=never")
    log(f"resharding {path.name} for this layout ({'; '.join(changes)}): weights and Adam state re-sliced "
        f"from its layout-free files; random streams of ranks whose role changed start afresh")
    # The files were hashed by rank 0 when the checkpoint was chosen; each rank maps only the
    # tensors it needs (weights_only unpickling, as everywhere).
    load_resharded(engine, named_params, groups, path, log)
