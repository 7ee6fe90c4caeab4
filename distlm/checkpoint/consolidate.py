"""Each checkpoint also holds the model by canonical name, so any layout loads into one process.

DeepSpeed's own files follow the layout that wrote them (``mp_rank_01_model_states.pt`` for a
tensor slice, ``layer_07-model_00-model_states.pt`` for a pipeline layer, ZeRO-3 partitions).
Beside them, the first data-parallel rank of every (stage, tp rank) writes
``model-stage{S}-tp{T}.pt``: its parameters under their names in the one-process
``Transformer``, each with the dimension it was sliced along. :func:`consolidated_state_dict`
joins the slices back into the one-process state dict; that is how a checkpoint of a 3D run
is evaluated, exported or resumed on another layout.

Files are plain dicts of tensors and ints, read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable

import torch

SHARD_RE = re.compile(r"^model-stage(\d{2,})-tp(\d{2,})\.pt$")


def shard_file(stage: int, tp_rank: int) -> str:
    return f"model-stage{stage:02d}-tp{tp_rank:02d}.pt"


def write_model_shard(folder: Path, named_params: Iterable[tuple[str, torch.nn.Parameter]], stage: int,
                      tp_rank: int, tp_size: int, pp: int, writes: bool) -> None:
    """Write this (stage, tp rank)'s weights; ``writes``: whether this rank saves the file.

    A collective over the data-parallel group: every dp rank calls it, since the fp32 master
    weights (ZeRO 1-3, bf16) are assembled from all ranks' partitions one parameter at a time
    (all at once could need more memory than training). Without a master copy (plain fp32;
    bf16 without ZeRO) the module's own weights are written.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    tensors, sliced, seen = {}, {}, set()
    for name, p in named_params:
        if name in seen:
            continue  # a tied table seen twice on one stage
        seen.add(name)
        master = safe_get_full_fp32_param(p)
        value = (master if master is not None else p).detach()
        if writes:
            tensors[name] = value.to("cpu", torch.float32, copy=True)
            if getattr(p, "tensor_model_parallel", False):
                sliced[name] = int(p.partition_dim)
    if writes:
        torch.save({"tensors": tensors, "sliced_dim": sliced, "tp_size": tp_size, "pp": pp, "stage": stage,
                    "tp_rank": tp_rank}, folder / shard_file(stage, tp_rank))


def consolidated_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """The one-process state dict (float32) from a checkpoint folder of any layout."""
    folder = Path(folder)
    shards = {}
    for path in folder.iterdir():
        m = SHARD_RE.match(path.name)
        if m:
            shards[(int(m.group(1)), int(m.group(2)))] = torch.load(path, map_location="cpu", weights_only=True)
    if not shards:
        raise FileNotFoundError(f"{folder} holds no model-stage*-tp*.pt files: it was saved by a distlm older than "
                                f"the layout-independent model files; resume it on its own layout instead")
    first_file = next(iter(shards.values()))
    tp_size, pp = first_file["tp_size"], first_file["pp"]
    stages = list(range(pp))
    missing = [(s, t) for s in stages for t in range(tp_size) if (s, t) not in shards]
    if missing:
        raise FileNotFoundError(f"{folder} lacks the model files of (stage, tp rank) {missing}: "
                                f"an incomplete copy of the checkpoint")
    full: dict[str, torch.Tensor] = {}
    for stage in stages:
        first = shards[(stage, 0)]
        for name, tensor in first["tensors"].items():
            if name in full:
                continue  # the tied token table lives on the first and the last stage
            dim = first["sliced_dim"].get(name)
            if dim is None:
                full[name] = tensor
            else:
                full[name] = torch.cat([shards[(stage, t)]["tensors"][name] for t in range(tp_size)], dim=dim)
    return full


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
