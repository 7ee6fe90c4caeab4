"""Each checkpoint also holds the model and its Adam state by canonical name, so any layout loads it.

DeepSpeed's own files follow the layout that wrote them (``mp_rank_01_model_states.pt`` for a
tensor slice, ``layer_07-model_00-model_states.pt`` for a pipeline layer, ZeRO-3 partitions).
Beside them, the first data-parallel rank of every (stage, tp rank) saves two files:

* ``model-stage{S}-tp{T}.pt``: its fp32 (master) weights under their names in the one-process
  ``Transformer``, each with the dimension it was sliced along for tensor parallelism.
  :func:`consolidated_state_dict` joins the slices back into the one-process state dict; that
  is how a checkpoint of a 3D run is evaluated and exported (which never reads optimizer state).
* ``optim-stage{S}-tp{T}.pt``: the AdamW moments (``exp_avg``, ``exp_avg_sq``) of the same
  parameters, sliced the same way, and the optimizer's step counter.
  :func:`consolidated_optimizer_state` joins them; :mod:`distlm.checkpoint.reshard` cuts both
  for another (tp, pp, dp) layout or ZeRO stage.

:func:`shard_payloads` assembles both as dicts of CPU tensors and leaves writing them to the
caller (which may do so in a background thread while training goes on). Files are plain dicts
of tensors and ints, read with ``torch.load(weights_only=True)``.

Where the fp32 weights and Adam state live depends on DeepSpeed's optimizer wrapper
(:class:`OptimizerAccess`): ZeRO 1/2 and the bf16 optimizer keep flat fp32 partitions
(``_hp_mapping`` on each parameter), ZeRO 3 its own partitions (``ds_id``), bf16 without ZeRO
and pipeline a per-parameter fp32 copy (``FP16_UnfusedOptimizer``), and plain fp32 without ZeRO
hands torch's AdamW the module's own parameters.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from distlm.checkpoint.errors import CheckpointError

SHARD_RE = re.compile(r"^model-stage(\d{2,})-tp(\d{2,})\.pt$")
OPTIM_RE = re.compile(r"^optim-stage(\d{2,})-tp(\d{2,})\.pt$")
MOMENTS = ("exp_avg", "exp_avg_sq")


def shard_file(stage: int, tp_rank: int) -> str:
    return f"model-stage{stage:02d}-tp{tp_rank:02d}.pt"


def optim_file(stage: int, tp_rank: int) -> str:
    return f"optim-stage{stage:02d}-tp{tp_rank:02d}.pt"


# --------------------------------------------------------------------------- where the state lives


class OptimizerAccess:
    """The full (this tp slice's, unpartitioned) fp32 weight and Adam moments of each parameter.

    ``optimizer``: ``engine.optimizer`` (a DeepSpeed wrapper or torch's AdamW itself); None for
    the weights only. ``params``: the parameters that will be read or set. The getters are
    collectives over the parameter's data-parallel group for ZeRO 1-3 and the bf16 optimizer
    (each rank holds a partition): every dp rank calls them for the same parameters in the same
    order. The setters take the full value and keep this rank's part; they communicate nothing.
    """

    def __init__(self, optimizer, params: Iterable[torch.nn.Parameter] = ()):
        self.wrapper = optimizer
        self.params = list(params)
        self._linked = False
        self.torch_opt = getattr(optimizer, "optimizer", optimizer) if optimizer is not None else None
        # FP16_UnfusedOptimizer (bf16 without ZeRO, pipeline off): an fp32 copy per parameter.
        self.fp32_copy: dict[int, torch.Tensor] = {}
        for lp_group, hp_group in zip(getattr(optimizer, "fp16_groups", None) or [],
                                      getattr(optimizer, "fp32_groups", None) or []):
            if isinstance(hp_group, (list, tuple)):
                for lp, hp in zip(lp_group, hp_group):
                    self.fp32_copy[id(lp)] = hp
        self.own = set()  # parameters torch's optimizer steps itself (its state is keyed by them)
        if self.torch_opt is not None:
            self.own = {id(p) for group in self.torch_opt.param_groups for p in group["params"]}

    # which kind of parameter
    @staticmethod
    def kind_of(p) -> str:
        if hasattr(p, "ds_id"):
            return "zero3"
        if hasattr(p, "_hp_mapping"):
            return "flat"  # ZeRO 1/2, bf16 optimizer
        return "tensor"

    def has_state(self) -> bool:
        """False before the first optimizer step (torch's AdamW creates its state lazily)."""
        return self.torch_opt is not None and any("exp_avg" in s for s in self.torch_opt.state.values())

    def step(self) -> int:
        """The Adam step counter (bias correction); 0 before the first step."""
        if self.torch_opt is None:
            return 0
        steps = [int(s["step"]) for s in self.torch_opt.state.values() if "step" in s]
        return max(steps, default=0)

    def _tensor_state_owner(self, p) -> torch.Tensor:
        if id(p) in self.fp32_copy:
            return self.fp32_copy[id(p)]
        if id(p) in self.own:
            return p
        raise CheckpointError(f"{type(self.wrapper).__name__} keeps no fp32 state for a parameter of shape "
                              f"{tuple(p.shape)}: an optimizer wrapper distlm does not know")

    # reading (collective for zero3 / flat)
    def master(self, p) -> torch.Tensor:
        kind = self.kind_of(p)
        if kind != "tensor":
            from deepspeed.utils import safe_get_full_fp32_param

            value = safe_get_full_fp32_param(p)
            if value is None:
                raise CheckpointError(f"DeepSpeed returned no fp32 weight for a parameter of shape {local_shape(p)}")
            return value
        return self.fp32_copy.get(id(p), p)

    def _link_flat_state(self) -> None:
        """Point each ZeRO 1/2 / bf16 parameter at its slice of its group's flat Adam state.

        DeepSpeed links them once, after its first step; ZeRO 1/2 step one group at a time and
        link every group after the first group's step, when the other groups have no state yet,
        so without this the moments of all but the first group are unreachable.
        """
        if self._linked:
            return
        for p in self.params:
            mapping = getattr(p, "_hp_mapping", None)
            if mapping is not None:
                flat = self.torch_opt.param_groups[mapping.param_group_index]["params"][0]
                mapping.set_optim_state_fragment(flat, self.torch_opt.state[flat])
        if hasattr(self.wrapper, "_hp_optimizer_states_linked"):
            self.wrapper._hp_optimizer_states_linked = True
        self._linked = True

    def moment(self, p, key: str) -> torch.Tensor:
        if not self.has_state():
            return torch.zeros(local_shape(p), dtype=torch.float32)
        kind = self.kind_of(p)
        if kind == "flat":
            self._link_flat_state()
        if kind != "tensor":
            from deepspeed.utils import safe_get_full_optimizer_state

            return safe_get_full_optimizer_state(p, key)
        state = self.torch_opt.state.get(self._tensor_state_owner(p), {})
        return state[key] if key in state else torch.zeros(local_shape(p), dtype=torch.float32)

    # writing (local: every rank keeps its own part of the full value)
    def ensure_state(self, step: int) -> None:
        """Create torch AdamW's state where it is still empty, and set every step counter to ``step``.

        ZeRO 1-3 and the bf16 optimizer step a flat fp32 partition per group (one counter each),
        plain AdamW every parameter; either way all counters are ``step`` afterwards, so bias
        correction continues. ZeRO 1/2 and bf16 then link each parameter (of ``params``) to its
        slice of the flat state, which DeepSpeed otherwise does after the first step.
        """
        opt = self.torch_opt
        for group, p in self._stepped_tensors():
            if group.get("amsgrad"):
                raise CheckpointError("AdamW with amsgrad keeps max_exp_avg_sq, which the optimizer files do not hold")
            state = opt.state[p]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = _step_tensor(step, group, p)
        self._linked = False
        self._link_flat_state()

    def _stepped_tensors(self) -> list[tuple[dict, torch.Tensor]]:
        """(param group, tensor) for every tensor torch's AdamW steps and keeps state for."""
        opt = self.torch_opt
        flats = getattr(self.wrapper, "fp32_partitioned_groups_flat", None)
        if flats is not None:  # ZeRO 3 hands AdamW one sub-group's flat partition per step, then takes it back
            to_group = self.wrapper.sub_group_to_group_id
            return [(opt.param_groups[to_group[i]], flat) for i, flat in enumerate(flats)]
        return [(group, p) for group in opt.param_groups for p in group["params"]]

    def set_master(self, p, value: torch.Tensor) -> None:
        """The fp32 master and the module's (possibly bf16) working copy, from the full fp32 value."""
        kind = self.kind_of(p)
        with torch.no_grad():
            if kind == "zero3":
                opt = p._z3_optimizer
                _zero3_set_partition(opt, p, value, None)
                _copy_partition(p.ds_tensor, value, opt._get_param_partition_rank(p))
                if p.data.numel() == value.numel():  # gathered now, or persistent (small) parameters
                    p.data.copy_(value.view_as(p.data))
                return
            if kind == "flat":
                from deepspeed.utils import safe_set_full_fp32_param

                safe_set_full_fp32_param(p, value.to(p.device))
            elif id(p) in self.fp32_copy:
                self.fp32_copy[id(p)].copy_(value)
            p.data.copy_(value)  # ZeRO 1/2 and bf16 keep the whole working copy on every dp rank

    def set_moment(self, p, key: str, value: torch.Tensor) -> None:
        kind = self.kind_of(p)
        with torch.no_grad():
            if kind == "zero3":
                _zero3_set_partition(p._z3_optimizer, p, value, key)
            elif kind == "flat":
                from deepspeed.utils import safe_set_full_optimizer_state

                safe_set_full_optimizer_state(p, value.to(p.device), key)
            else:
                self.torch_opt.state[self._tensor_state_owner(p)][key].copy_(value)


def local_shape(p) -> torch.Size:
    """This rank's tp slice's shape (ZeRO 3 keeps an empty tensor in ``p`` itself)."""
    return torch.Size(p.ds_shape) if hasattr(p, "ds_shape") else p.shape


def _step_tensor(step: int, group: dict, p: torch.Tensor) -> torch.Tensor:
    # As torch's Adam creates it: on the device only for its fused / capturable kernels.
    if group.get("fused") or group.get("capturable"):
        return torch.tensor(float(step), dtype=torch.float32, device=p.device)
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    return torch.tensor(float(step), dtype=dtype)


def _copy_partition(partition: torch.Tensor, value: torch.Tensor, rank: int) -> None:
    """Rank ``rank``'s equal share of ``value`` flattened; the last share's padding is zeroed."""
    n = partition.numel()
    chunk = value.reshape(-1)[rank * n:(rank + 1) * n]
    flat = partition.view(-1)
    flat[chunk.numel():].zero_()
    flat[:chunk.numel()].copy_(chunk)


def _zero3_set_partition(opt, p, value: torch.Tensor, key: Optional[str]) -> None:
    # DeepSpeed's set_full_hp_param asserts an unpadded size, which the last rank's partition
    # of a parameter not divisible by dp does not have: this pads.
    if getattr(opt, "swap_optimizer", False):
        raise CheckpointError("ZeRO-3 with the optimizer state offloaded to NVMe: not supported by resharding")
    partition, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    _copy_partition(partition, value.to(partition.device), opt._get_param_partition_rank(p))


# --------------------------------------------------------------------------- saving


def _cpu_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float32, copy=True)


def shard_payloads(named_params: Iterable[tuple[str, torch.nn.Parameter]], optimizer, stage: int, tp_rank: int,
                   tp_size: int, pp: int, writes: bool) -> dict[str, dict]:
    """This (stage, tp rank)'s files as ``{file name: dict}``; ``writes``: whether this rank saves them.

    A collective over the data-parallel group: every dp rank calls it, since the fp32 master
    weights and Adam moments (ZeRO 1-3, bf16) are assembled from all ranks' partitions one
    parameter at a time (all at once could need more memory than training). Ranks with
    ``writes=False`` get ``{}``. The tensors are CPU copies, valid while training goes on.

    ``{shard_file: {"tensors", "sliced_dim", "tp_size", "pp", "stage", "tp_rank"},
    optim_file: {"exp_avg": {name: t}, "exp_avg_sq": {name: t}, "step", "sliced_dim", "tp_size",
    "pp", "stage", "tp_rank"}}``; ``optimizer=None`` gives the weights file only.
    """
    named_params = list(named_params)
    access = OptimizerAccess(optimizer, [p for _, p in named_params])
    if not writes and all(access.kind_of(p) == "tensor" for _, p in named_params):
        return {}  # nothing partitioned: the other dp ranks need no part in assembling it
    tensors, sliced, seen = {}, {}, set()
    moments: dict[str, dict] = {key: {} for key in MOMENTS}
    for name, p in named_params:
        if name in seen:
            continue  # a tied table seen twice on one stage
        seen.add(name)
        value = access.master(p)
        if writes:
            tensors[name] = _cpu_copy(value)
            if getattr(p, "tensor_model_parallel", False):
                sliced[name] = int(p.partition_dim)
        del value
        if optimizer is not None:
            for key in MOMENTS:
                value = access.moment(p, key)
                if writes:
                    moments[key][name] = _cpu_copy(value)
                del value
    if not writes:
        return {}
    meta = {"sliced_dim": sliced, "tp_size": tp_size, "pp": pp, "stage": stage, "tp_rank": tp_rank}
    out = {shard_file(stage, tp_rank): {"tensors": tensors, **meta}}
    if optimizer is not None:
        out[optim_file(stage, tp_rank)] = {**moments, "step": access.step(), **meta}
    return out


# --------------------------------------------------------------------------- joining


def _read_shards(folder: Path, pattern: re.Pattern, load: Callable[[Path], dict]) -> dict[tuple[int, int], dict]:
    shards = {}
    for path in folder.iterdir():
        m = pattern.match(path.name)
        if m:
            shards[(int(m.group(1)), int(m.group(2)))] = load(path)
    return shards


def _missing(shards: dict) -> tuple[int, int, list]:
    first = next(iter(shards.values()))
    tp_size, pp = first["tp_size"], first["pp"]
    return tp_size, pp, [(s, t) for s in range(pp) for t in range(tp_size) if (s, t) not in shards]


def _join(shards: dict, key: str, tp_size: int, pp: int) -> dict[str, torch.Tensor]:
    full: dict[str, torch.Tensor] = {}
    for stage in range(pp):
        first = shards[(stage, 0)]
        for name, tensor in first[key].items():
            if name in full:
                continue  # the tied token table lives on the first and the last stage
            dim = first["sliced_dim"].get(name)
            if dim is None:
                full[name] = tensor
            else:
                full[name] = torch.cat([shards[(stage, t)][key][name] for t in range(tp_size)], dim=dim)
    return full


def _torch_load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _complete_shards(folder: Path, pattern: re.Pattern, what: str, error: type) -> tuple[dict, int, int]:
    """Every (stage, tp rank) file of one kind, or ``error`` saying which are missing."""
    shards = _read_shards(folder, pattern, _torch_load)
    if not shards:
        raise error(f"{folder} holds no {what}-stage*-tp*.pt files: it was saved by a distlm older than the "
                    f"layout-independent {what} files; resume it on its own layout instead")
    tp_size, pp, missing = _missing(shards)
    if missing:
        raise error(f"{folder} lacks the {what} files of (stage, tp rank) {missing}: an incomplete copy of the checkpoint")
    return shards, tp_size, pp


def consolidated_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The one-process state dict (float32) from a checkpoint folder of any layout."""
    shards, tp_size, pp = _complete_shards(Path(folder), SHARD_RE, "model", FileNotFoundError)
    return _join(shards, "tensors", tp_size, pp)


def consolidated_optimizer_state(folder: str | Path) -> dict:
    """The one-process AdamW state from a checkpoint folder of any layout.

    ``{"exp_avg": {name: tensor}, "exp_avg_sq": {name: tensor}, "step": int}``, float32, names
    as in :func:`consolidated_state_dict`.
    """
    folder = Path(folder)
    shards, tp_size, pp = _complete_shards(folder, OPTIM_RE, "optim", CheckpointError)
    steps = {optim_file(*k): s["step"] for k, s in shards.items()}
    if len(set(steps.values())) != 1:
        raise CheckpointError(f"{folder}: the optimizer files disagree on the step: {steps}")
    return {**{key: _join(shards, key, tp_size, pp) for key in MOMENTS}, "step": int(next(iter(steps.values())))}


def load_one_process_model(folder: str | Path, build: Callable[[dict], torch.nn.Module]) -> torch.nn.Module:
    """``build(model_config_dict)`` makes the one-process model; its weights come from the checkpoint."""
    import json

    folder = Path(folder)
    config = json.loads((folder / "distlm.json").read_text())["config"]
    model = build(config["model"])
    state = consolidated_state_dict(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyError(f"{folder}: the model files do not fit the saved config (missing {missing}, "
                       f"unexpected {unexpected})")
    return model
