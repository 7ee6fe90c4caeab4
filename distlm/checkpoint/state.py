"""Checkpoints v1: DeepSpeed's engine state plus distlm's own (step, data position, RNG).

Layout of one checkpoint::

    CKPT_DIR/latest                  the newest committed tag, e.g. "step-00000100"
    CKPT_DIR/step-00000100/          DeepSpeed's model / optimizer / ZeRO shards
        distlm-rank00000.pt          this rank's RNG states (torch.load(weights_only=True))
        model-stage00-tp00.pt        the weights by canonical name, one file per (stage, tp rank)
        distlm.json                  step, data position, counters, config; written last

``distlm.json`` is the commit marker: a folder without it is an interrupted save and is never
loaded. ``latest`` is replaced only after it. (Fsync ordering, hashes, fallback and async
saves come with the checkpoint issue; they slot into :func:`save` and :func:`find_resume`.)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from distlm.checkpoint.errors import CheckpointError
from distlm.fsutil import atomic_write_text
from distlm.parallel.distributed import DistContext, barrier

MARKER = "distlm.json"
# 2: parameters under the names of the tensor-/pipeline-parallel model, plus the model files by
# canonical name. Version 1 checkpoints name some parameters differently (norm_f, pos_emb).
FORMAT = 2
TAG_RE = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """What the loop needs, besides the engine, to continue exactly where it stopped."""

    step: int = 0               # optimizer steps completed
    rows_consumed: int = 0      # global training rows read (the data stream's position)
    tokens_seen: int = 0
    elapsed_s: float = 0.0      # training wall time before this process started
    data: dict = field(default_factory=dict)  # the loader's position per source (train/data.py)


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


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


# --------------------------------------------------------------------------- save


def save(engine, ckpt_dir: str | os.PathLike, state: TrainState, config: dict, ctx: DistContext,
         keep_last: int = 0, log: Callable[[str], None] = print,
         write_model_files: Optional[Callable[[Path], None]] = None, tp_rng=None) -> Path:
    """Save on every rank (a collective call); return the checkpoint folder.

    ``write_model_files(folder)``: called on every rank after DeepSpeed's files, before the
    marker (see :mod:`distlm.checkpoint.consolidate`). ``tp_rng``: the tensor-parallel dropout
    stream (``TPRandom``), saved with this rank's other random states.
    """
    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(state.step)
    path = ckpt_dir / tag
    started = time.perf_counter()
    if ctx.is_main and path.exists():
        # A folder of this step from an abandoned line of the run (after resuming from an older
        # checkpoint): its marker must not vouch for a half-overwritten folder.
        shutil.rmtree(path)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, save_latest=False)
    torch.save({**rng_state(), **({"tp": tp_rng.state_dict()} if tp_rng is not None else {})},
               path / f"distlm-rank{ctx.rank:05d}.pt")
    if write_model_files is not None:
        write_model_files(path)
    barrier()  # every rank's files are on disk before the marker says the folder is whole
    if ctx.is_main:
        marker = {"format": FORMAT, "step": state.step, "state": asdict(state), "world_size": ctx.world_size,
                  "saved_at": time.time(), "config": config}
        atomic_write_text(path / MARKER, json.dumps(marker, indent=1))
        atomic_write_text(ckpt_dir / "latest", tag)
        removed = apply_retention(ckpt_dir, keep_last, protect=tag)
        log(f"checkpoint {path} saved in {time.perf_counter() - started:.1f} s"
            + (f"; removed {', '.join(removed)}" if removed else ""))
    barrier()
    return path


def committed_steps(ckpt_dir: Path) -> list[Path]:
    """Checkpoint folders that finished saving, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if TAG_RE.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name)


def apply_retention(ckpt_dir: Path, keep_last: int, protect: str) -> list[str]:
    if keep_last <= 0:
        return []
    removed = []
    for old in committed_steps(ckpt_dir)[:-keep_last]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old.name)
    return removed


# --------------------------------------------------------------------------- load


def find_resume(resume: str, ckpt_dir: str | os.PathLike, log: Callable[[str], None] = print) -> Optional[Path]:
    """Which checkpoint to continue from: None for a fresh start.

    Never starts from scratch silently: with ``auto``, checkpoint folders that exist but none of
    which finished saving are an error, not a fresh run.
    """
    ckpt_dir = Path(ckpt_dir)
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not (path / MARKER).is_file():
            raise CheckpointError(f"train.resume={resume}: no finished checkpoint there "
                                  f"(expected {path / MARKER}); point it at a step-N folder or use auto")
        return path
    done = committed_steps(ckpt_dir)
    latest_file = ckpt_dir / "latest"
    if latest_file.is_file():
        tag = latest_file.read_text().strip()
        if (ckpt_dir / tag / MARKER).is_file():
            return ckpt_dir / tag
        log(f"WARNING: {latest_file} names {tag!r}, which is not a finished checkpoint; "
            f"using the newest finished one instead")
    if done:
        return done[-1]
    partial = [p.name for p in ckpt_dir.iterdir() if TAG_RE.match(p.name)] if ckpt_dir.is_dir() else []
    if partial:
        raise CheckpointError(f"{ckpt_dir} holds {', '.join(sorted(partial))} but none finished saving "
                              f"(no {MARKER}); delete them to start fresh, or set train.resume=never")
    return None


# Keys whose change makes a checkpoint unusable (the weights or their partitioning would not fit)
# or the run not the one that was saved (the data order); the rest may change on resume.
_MUST_MATCH = ("model.", "train.seq_len", "parallel.tp", "parallel.pp", "parallel.zero_stage",
               "parallel.pipeline_partition")  # sequence_parallel and recomputation may change
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


def check_compatible(path: Path, config: dict, log: Callable[[str], None] = print) -> None:
    """Refuse a checkpoint whose model or layout differs from the config; warn on data changes."""
    marker = json.loads((path / MARKER).read_text())
    if marker.get("format", 1) != FORMAT:
        raise CheckpointError(f"{path} was saved by a distlm whose checkpoint format is {marker.get('format', 1)}, "
                              f"not {FORMAT} (the parameters of the model were renamed for tensor and pipeline "
                              f"parallelism); resume it with the distlm that saved it, or set train.resume=never")
    saved = _flatten(marker.get("config", {}))
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


def load(engine, path: Path, ctx: DistContext, log: Callable[[str], None] = print, tp_rng=None) -> TrainState:
    """Restore the engine and RNG on every rank; return the loop's state."""
    marker = json.loads((path / MARKER).read_text())
    load_path, _ = engine.load_checkpoint(str(path.parent), tag=path.name,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {path}")
    rng_file = path / f"distlm-rank{ctx.rank:05d}.pt"
    if marker.get("world_size") == ctx.world_size and rng_file.is_file():
        saved = torch.load(rng_file, weights_only=True)
        set_rng_state(saved)
        if tp_rng is not None and "tp" in saved:
            tp_rng.load_state_dict(saved["tp"])
    elif ctx.is_main:
        log(f"NOTE: {path} was saved by {marker.get('world_size')} ranks and is loaded by "
            f"{ctx.world_size}; random states start afresh (data order is unaffected)")
    return TrainState(**marker["state"])
