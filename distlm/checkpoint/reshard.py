"""Resume a checkpoint on another (tp, pp, dp) layout or ZeRO stage, from its canonical files.

DeepSpeed's own files only load into the layout that wrote them. The files of
:mod:`distlm.checkpoint.consolidate` hold, per (stage, tp rank), the fp32 weights and AdamW
moments under their one-process names with the dimension they were sliced along, and the Adam
step counter. :func:`load_resharded` joins each tensor this rank holds from the old tp slices,
cuts this rank's slice, and puts it where this engine keeps it: the fp32 master and the
module's working copy (bf16 or fp32), both moments, and every step counter of torch's AdamW,
so the next step is the one the saved run would have taken (up to the summation order a
different layout brings).

What is not restored: the random states (per rank: a rank's streams belong to its old role, so
the caller keeps the fresh ones) and DeepSpeed's loss scaler (fp16 only, refused here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from distlm.checkpoint.consolidate import MOMENTS, OptimizerAccess, local_shape, optim_file, shard_file
from distlm.checkpoint.errors import CheckpointError


class _SavedTensors:
    """One kind of canonical file (model or optim) of a checkpoint, each file read when first needed."""

    def __init__(self, name_of: Callable[[int, int], str], keys: tuple[str, ...], load: Callable[[str], dict]):
        self.name_of, self.keys, self._load = name_of, keys, load
        self.pattern = name_of(0, 0).replace("00", "*")  # model-stage*-tp*.pt
        self._files: dict[tuple[int, int], dict] = {}
        first = self.file(0, 0)
        self.tp, self.pp = int(first["tp_size"]), int(first["pp"])
        self.stage_of: dict[str, int] = {}  # canonical name -> the first saved stage that holds it
        for stage in range(self.pp):
            for name in self.file(stage, 0)[keys[0]]:
                self.stage_of.setdefault(name, stage)

    def file(self, stage: int, tp_rank: int) -> dict:
        if (stage, tp_rank) not in self._files:
            name = self.name_of(stage, tp_rank)
            try:
                data = self._load(name)
            except FileNotFoundError:
                raise CheckpointError(f"{name} is missing from the checkpoint: an incomplete copy, or a checkpoint "
                                      f"older than the layout-independent model and optimizer files (resume it "
                                      f"on the layout that saved it)") from None
            for key in ("tp_size", "pp", *self.keys):
                if key not in data:
                    raise CheckpointError(f"{name}: not a distlm {self.keys[0]} file (no {key!r})")
            if (stage, tp_rank) != (0, 0) and (data["tp_size"], data["pp"]) != (self.tp, self.pp):
                raise CheckpointError(f"{name} was saved by tp {data['tp_size']} x pp {data['pp']}, "
                                      f"{self.name_of(0, 0)} by tp {self.tp} x pp {self.pp}: files of two checkpoints")
            self._files[(stage, tp_rank)] = data
        return self._files[(stage, tp_rank)]

    def check(self, name: str) -> Optional[str]:
        """Why ``name`` cannot be joined from the saved slices; None when it can."""
        if name not in self.stage_of:
            return (f"no {self.pattern} file holds {name}: the checkpoint is of another model (or its files "
                    f"are of an older distlm)")
        stage = self.stage_of[name]
        first = self.file(stage, 0)
        sliced = name in first["sliced_dim"]
        for t in range(self.tp if sliced else 1):
            for key in self.keys:
                part = self.file(stage, t)[key].get(name)
                if part is None or part.shape != first[self.keys[0]][name].shape:
                    return (f"{self.name_of(stage, t)}: {key} of {name} is "
                            f"{'missing' if part is None else f'of shape {tuple(part.shape)}'}, unlike in "
                            f"{self.name_of(stage, 0)}")
        return None

    def full(self, key: str, name: str) -> torch.Tensor:
        """The unsliced tensor (one-process shape), joined from the saved tp slices."""
        stage = self.stage_of[name]
        first = self.file(stage, 0)
        dim = first["sliced_dim"].get(name)
        if dim is None:
            return first[key][name]
        return torch.cat([self.file(stage, t)[key][name] for t in range(self.tp)], dim=dim)


def _expected_full_shape(p, tp_size: int) -> torch.Size:
    shape = list(local_shape(p))
    if getattr(p, "tensor_model_parallel", False):
        shape[p.partition_dim] *= tp_size
    return torch.Size(shape)


def _does_not_fit(name: str, p, weights: _SavedTensors, optim: Optional[_SavedTensors], tp_size: int) -> Optional[str]:
    if getattr(p, "tensor_model_parallel", False) and int(getattr(p, "tp_size", tp_size)) != tp_size:
        return f"{name} is cut into {p.tp_size} slices, the layout into tp={tp_size}"
    for saved in (weights, optim) if optim is not None else (weights,):
        problem = saved.check(name)
        if problem:
            return problem
    stage = weights.stage_of[name]
    first = weights.file(stage, 0)
    shape = list(first["tensors"][name].shape)
    dim = first["sliced_dim"].get(name)
    if dim is not None:
        shape[dim] *= weights.tp
    want = _expected_full_shape(p, tp_size)
    if torch.Size(shape) != want:
        return (f"{weights.name_of(stage, 0)} holds {name} with the one-process shape {tuple(shape)}, this "
                f"model's is {tuple(want)}: the checkpoint is of another model")
    if optim is None:
        return None
    moment_shape = optim.file(optim.stage_of[name], 0)[MOMENTS[0]][name].shape
    if moment_shape != first["tensors"][name].shape:
        return (f"{optim.name_of(optim.stage_of[name], 0)} holds moments of {name} of shape {tuple(moment_shape)}, "
                f"{weights.name_of(stage, 0)} its weight of shape {tuple(first['tensors'][name].shape)}")
    return None


def _my_slice(full: torch.Tensor, p, tp_rank: int, tp_size: int) -> torch.Tensor:
    if getattr(p, "tensor_model_parallel", False):
        full = full.chunk(tp_size, dim=p.partition_dim)[tp_rank]
    return full.to(torch.float32).contiguous()


def _mmap_loader(folder: Path) -> Callable[[str], dict]:
    def load(name: str) -> dict:
        # mmap: a rank reads the bytes of the tensors it uses, not every file whole.
        return torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
    return load


def _agree_on_fit(problems: list[str], named: list, weights: Optional[_SavedTensors], source: str, failure: str,
                  advice: str = "") -> None:
    """Exchange every rank's problems and parameter names; raise the same CheckpointError on all of them.

    A collective: each rank calls it, with or without problems, so none is left waiting when
    another finds the checkpoint does not fit. Parameters the checkpoint holds that no rank
    uses mean it is of another model.
    """
    from distlm.parallel.distributed import all_gather_objects

    gathered = all_gather_objects((problems, [name for name, _ in named]))
    errors = sorted({msg for probs, _ in gathered for msg in probs})
    if errors:
        shown = "; ".join(errors[:6]) + (f"; and {len(errors) - 6} more" if len(errors) > 6 else "")
        raise CheckpointError(f"{failure}: {shown}{advice}")
    used = {name for _, names in gathered for name in names}
    unused = sorted(set(weights.stage_of) - used)
    if unused:
        raise CheckpointError(f"{source} holds parameters this model does not have: {unused[:8]}"
                              f"{' ...' if len(unused) > 8 else ''}: the checkpoint is of another model")


def load_resharded(engine, named_params: Iterable[tuple[str, torch.nn.Parameter]], groups, folder: str | Path,
                   log: Callable[[str], None] = print, *, load_file: Optional[Callable[[str], dict]] = None) -> int:
    """Set this rank's weights and AdamW state from the canonical files in ``folder``; return the Adam step.

    A collective on every rank (one exchange of names and errors, so a checkpoint that does not
    fit fails on every rank together instead of leaving some waiting). ``named_params``: this
    rank's (one-process name, parameter) pairs, as the checkpoint writer lists them; ``groups``:
    the :class:`~distlm.parallel.layout.ParallelGroups`. ``load_file(name)``: how to read one
    file of the checkpoint (default: ``torch.load(weights_only=True, mmap=True)`` from
    ``folder``); a caller that verifies hashes passes its own.

    The engine must not have stepped since it was built, or must be on the same footing: the
    optimizer state is created where torch's AdamW has none yet, and overwritten where it has.
    """
    folder = Path(folder)
    load = load_file or _mmap_loader(folder)
    tp_rank, tp_size = groups.coords.tp_rank, groups.layout.tp
    named, seen = [], set()
    for name, p in named_params:
        if name not in seen:
            seen.add(name)
            named.append((name, p))

    problems: list[str] = []
    weights = optim = None
    try:
        weights = _SavedTensors(shard_file, ("tensors",), load)
        optim = _SavedTensors(optim_file, MOMENTS, load)
        if (optim.tp, optim.pp) != (weights.tp, weights.pp):
            raise CheckpointError(f"{folder}: the optimizer files were saved by tp {optim.tp} x pp {optim.pp}, the "
                                  f"model files by tp {weights.tp} x pp {weights.pp}")
        steps = {optim.file(s, 0)["step"] for s in range(optim.pp)}
        if len(steps) != 1:
            raise CheckpointError(f"{folder}: the optimizer files of the stages disagree on the step: {sorted(steps)}")
        for name, p in named:
            problem = _does_not_fit(name, p, weights, optim, tp_size)
            if problem:
                problems.append(problem)
    except Exception as e:  # reported on every rank below, so none is left waiting in the exchange
        problems.append(str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}")

    _agree_on_fit(problems, named, weights, str(folder), f"cannot load {folder} on {groups.layout.describe()}")

    step = int(next(iter(steps)))
    access = OptimizerAccess(engine.optimizer, [p for _, p in named])
    access.ensure_state(step)
    for name, p in named:
        access.set_master(p, _my_slice(weights.full("tensors", name), p, tp_rank, tp_size))
        for key in MOMENTS:
            access.set_moment(p, key, _my_slice(optim.full(key, name), p, tp_rank, tp_size))
    # DeepSpeed's counters (its logging and profiler use them; distlm's loop counts its own steps).
    engine.global_steps = step
    engine.global_samples = step * engine.train_batch_size()
    if groups.rank == 0:
        log(f"resharded {folder.name}: saved by tp {weights.tp} x pp {weights.pp}, loaded into "
            f"{groups.layout.describe()} ({type(engine.optimizer).__name__}); Adam step {step}")
    return step


def load_weights(named_params: Iterable[tuple[str, torch.nn.Parameter]], groups, folder: str | Path,
                 optimizer=None) -> int:
    """Set this rank's parameters from the model files in ``folder`` (fine-tuning); return their count.

    Weights only: no optimizer state, no step, no random state. ``optimizer``: the engine's
    (``engine.optimizer``), whose fp32 masters (ZeRO partitions, bf16 master copies) are set
    along with the module's working copy; None sets the module's parameters alone (before an
    engine exists). On every rank: like :func:`load_resharded` it is a collective that fails on
    every rank together, naming each parameter that does not fit.
    """
    folder = Path(folder)
    load = _mmap_loader(folder)
    tp_rank, tp_size = groups.coords.tp_rank, groups.layout.tp
    named = list({name: p for name, p in named_params}.items())  # a tied tensor once
    problems: list[str] = []
    weights = None
    try:
        weights = _SavedTensors(shard_file, ("tensors",), load)
        problems = [msg for msg in (_does_not_fit(name, p, weights, None, tp_size) for name, p in named) if msg]
    except Exception as e:  # reported on every rank below, so none is left waiting in the exchange
        problems.append(str(e) if isinstance(e, CheckpointError) else f"{type(e).__name__}: {e}")
    _agree_on_fit(problems, named, weights, f"train.init_from={folder}",
                  f"train.init_from={folder}: its weights do not fit this model")
    access = OptimizerAccess(optimizer, [p for _, p in named])
    with torch.no_grad():
        for name, p in named:
            value = _my_slice(weights.full("tensors", name), p, tp_rank, tp_size)
            if optimizer is None:
                p.copy_(value)
            else:
                access.set_master(p, value)
    return len(named)
