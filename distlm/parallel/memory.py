"""What one rank should hold in weights and optimizer state, and what it really holds.

:func:`estimate_memory` predicts per-rank bytes from the rank's parameter count (the
parameters of its tensor/pipeline shard, before ZeRO), the data-parallel size, the ZeRO stage
and the precision. :func:`measure_memory` walks a live DeepSpeed engine and adds up the
storages it really keeps. :func:`memory_lines` puts the two side by side for the start-up log.

The rule (bytes per parameter; ``/dp`` means partitioned over the data-parallel ranks)
------------------------------------------------------------------------------------------

Mixed-precision Adam as in the ZeRO paper: 2 bytes of bf16 weights, 2 bytes of bf16
gradients and 12 bytes of optimizer state (fp32 master 4 + Adam m 4 + Adam v 4). ZeRO-1
partitions the optimizer's 12 over dp, ZeRO-2 the gradients as well, ZeRO-3 the weights too.

What DeepSpeed 0.19.8 really allocates, stage by stage (read from its source and checked
against measurements in ``tests/test_memory.py``):

=====  =========  =======  =========  ========================================================
stage  precision  weights  optimizer  where the optimizer bytes come from
=====  =========  =======  =========  ========================================================
0      fp32       4        8          the torch optimizer steps the model's own fp32 params:
                                      no master copy, only m and v
1, 2   fp32       4        12/dp      ``single_partition_of_fp32_groups`` is a ``clone()`` of
                                      this rank's slice even when the model is already fp32
3      fp32       4/dp     12/dp      ``fp32_partitioned_groups_flat`` is a copy too: stage3.py
                                      means to reuse the weight partition when dtypes match,
                                      but its test compares ``tensor.device`` with the device
                                      *name* (a str), which is never equal, so it clones
0      bf16       2        12         ``FP16_UnfusedOptimizer`` (DeepSpeed's "DDP bf16" path)
                                      keeps a whole fp32 master of every parameter
1      bf16       2        12/dp      ``BF16_Optimizer`` (chosen for bf16 + fp32 gradient
                                      accumulation at stage 1): fp32 master slice per rank
2      bf16       2        12/dp      ZeRO optimizer: fp32 master slice + m + v
3      bf16       2/dp     12/dp      ZeRO-3: bf16 weight partition + fp32 master slice
=====  =========  =======  =========  ========================================================

So every case is the ZeRO paper's rule with 4 + 4 + 12 in fp32, except fp32 at stage 0,
which has no master copy (4 + 4 + 8). ``/dp`` is a ceiling division; DeepSpeed's alignment
padding of flat buffers adds a few bytes that the estimate leaves out.

Gradients (informational, not measured): 4 (fp32) or 2 (bf16) bytes per parameter, divided
by dp from stage 2 on. DeepSpeed's bf16 runs with ZeRO>=1 accumulate gradients in fp32
(``data_types.grad_accum_dtype=fp32``), which this estimate does not add.

ZeRO-3 keeps parameters smaller than ``stage3_param_persistence_threshold`` (default 1e5
elements: biases, norms) whole on every rank *in addition to* their partition;
``estimate_memory(persistent_params=...)`` adds them (for an LM whose weights are mostly large
matrices they are negligible; in a tiny test model they are most of it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

PRECISIONS = ("fp32", "bf16")
MIB = 1024 * 1024


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class MemoryEstimate:
    params: int      # bytes of model weights this rank holds
    grads: int       # bytes of gradients (informational)
    optimizer: int   # bytes of optimizer state: fp32 master copy (when one exists) + Adam m and v

    @property
    def params_and_optimizer(self) -> int:
        return self.params + self.optimizer


def estimate_memory(rank_params: int, dp: int, zero_stage: int, precision: str,
                    persistent_params: int = 0) -> MemoryEstimate:
    """Bytes this rank holds for ``rank_params`` parameters (its tp/pp shard, before ZeRO).

    ``persistent_params``: under ZeRO-3, the parameters below ``stage3_param_persistence_threshold``
    elements, which every rank also keeps whole (see the module docstring).
    """
    if rank_params < 0:
        raise ValueError(f"rank_params must be >= 0; got {rank_params}")
    if dp < 1:
        raise ValueError(f"dp must be >= 1; got {dp}")
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3; got {zero_stage}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")

    n = rank_params
    shard = _ceil_div(n, dp)  # this rank's slice of a partitioned quantity
    weight_bytes = 4 if precision == "fp32" else 2
    grad_bytes = weight_bytes
    adam_bytes = 8  # m and v, always fp32

    params = weight_bytes * (shard + persistent_params if zero_stage >= 3 else n)
    grads = grad_bytes * (shard if zero_stage >= 2 else n)
    if zero_stage == 0:
        # fp32: the torch optimizer updates the model params in place; bf16: a whole fp32 master.
        optimizer = adam_bytes * n + (0 if precision == "fp32" else 4 * n)
    else:
        # An fp32 master slice (a copy even when the model is fp32) + m and v, all over dp.
        optimizer = (4 + adam_bytes) * shard
    return MemoryEstimate(params=params, grads=grads, optimizer=optimizer)


@dataclass(frozen=True)
class MemoryMeasure:
    params: int      # bytes of storages holding model weights (ZeRO-3: the local partitions)
    optimizer: int   # bytes of optimizer storages not already counted as weights

    @property
    def params_and_optimizer(self) -> int:
        return self.params + self.optimizer


# Where DeepSpeed's wrappers keep their fp32 master weights. ZeRO-3 empties the basic
# optimizer's param_groups between steps (stage3.py ``_optimizer_step`` puts the flat master
# in for the step and takes it out again), so the masters must be read from the wrapper.
_MASTER_ATTRS = (
    "fp32_partitioned_groups_flat",     # ZeRO-3 (stage3.py)
    "single_partition_of_fp32_groups",  # ZeRO-1/2 (stage_1_and_2.py)
    "fp32_groups_flat_partition",       # BF16_Optimizer (bf16 + ZeRO-1 + fp32 grad accumulation)
    "fp32_groups_flat",                 # FP16_Optimizer (fused)
    "fp32_groups",                      # FP16_UnfusedOptimizer (bf16, ZeRO-0)
)


def _optimizer_chain(engine) -> list:
    """DeepSpeed's optimizer wrappers from the outside in; the last is the basic torch optimizer."""
    chain = []
    opt = getattr(engine, "optimizer", None)
    while opt is not None and all(opt is not o for o in chain):
        chain.append(opt)
        opt = getattr(opt, "optimizer", None)
    return chain


def _flatten(x) -> Iterable:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for item in x:
            yield from _flatten(item)
    elif isinstance(x, dict):
        for item in x.values():
            yield from _flatten(item)


class _StorageCounter:
    """Adds up distinct untyped storages, each once, at its full size."""

    def __init__(self) -> None:
        self._seen: set[tuple[str, int]] = set()

    def add(self, tensors: Iterable) -> int:
        total = 0
        for t in tensors:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            nbytes = storage.nbytes()
            if nbytes == 0:
                continue
            key = (str(t.device), storage.data_ptr())
            if key in self._seen:
                continue
            self._seen.add(key)
            total += nbytes
        return total


def _param_tensors(module) -> Iterable[torch.Tensor]:
    for p in module.parameters():
        yield p.data
        ds_tensor = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's partition
        if ds_tensor is not None:
            yield ds_tensor


def _optimizer_tensors(chain: list) -> Iterable[torch.Tensor]:
    if not chain:
        return
    wrappers, basic = chain[:-1], chain[-1]
    for wrapper in wrappers:
        for name in _MASTER_ATTRS:
            yield from _flatten(getattr(wrapper, name, None))
    for group in getattr(basic, "param_groups", ()):
        yield from _flatten(group.get("params", ()))
    yield from _flatten(dict(getattr(basic, "state", {})))


def measure_memory(engine) -> MemoryMeasure:
    """Bytes of weights and optimizer state this process holds, each storage counted once.

    Weights: the module's parameters (under ZeRO-3 the local partition ``ds_tensor``; the
    gathered ``p.data`` is empty outside forward/backward, except for parameters ZeRO-3
    persists whole). Optimizer: the fp32 masters the DeepSpeed wrappers keep, the basic torch
    optimizer's params (under ZeRO the fp32 master partitions; at stage 0 fp32 the model's own
    params, already counted as weights) and its state tensors (exp_avg, exp_avg_sq, step).
    Gradients are not counted.
    Flat buffers count at their whole storage size, once, however many views reach them.
    """
    counter = _StorageCounter()
    module = getattr(engine, "module", engine)
    params = counter.add(_param_tensors(module))
    optimizer = counter.add(_optimizer_tensors(_optimizer_chain(engine)))
    return MemoryMeasure(params=params, optimizer=optimizer)


def _mib(n: int) -> str:
    return f"{n / MIB:10.2f} MiB"


def _ratio(got: int, est: int) -> str:
    return f"{got / est:6.3f}" if est else "   n/a"


def memory_lines(est: MemoryEstimate, got: MemoryMeasure) -> list[str]:
    """A start-up report: estimated vs measured bytes per rank, in MiB, and measured/estimate."""
    rows = [("weights", est.params, got.params),
            ("optimizer", est.optimizer, got.optimizer),
            ("weights+optimizer", est.params_and_optimizer, got.params_and_optimizer)]
    lines = ["memory per rank:           estimated       measured   measured/est"]
    for name, e, g in rows:
        lines.append(f"  {name:<18} {_mib(e)} {_mib(g)}   {_ratio(g, e)}")
    lines.append(f"  {'gradients':<18} {_mib(est.grads)}   (estimate only, not measured)")
    return lines
