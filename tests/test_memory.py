"""Per-rank memory: the estimate's arithmetic, and the estimate against real DeepSpeed engines."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest

from helpers import free_ports
import torch

from distlm.parallel.memory import (MemoryEstimate, MemoryMeasure, estimate_memory, measure_memory,
                                    memory_lines)
from spawn import spawn_ranks

# ---------------------------------------------------------------------------------------------
# estimate_memory: hand-computed bytes for N = 1000 parameters
# ---------------------------------------------------------------------------------------------

N = 1000


@pytest.mark.parametrize("stage, precision, dp, params, grads, optimizer", [
    # fp32, dp=1: nothing to partition; only stage 0 lacks the fp32 master copy.
    (0, "fp32", 1, 4000, 4000, 8000),
    (1, "fp32", 1, 4000, 4000, 12000),
    (2, "fp32", 1, 4000, 4000, 12000),
    (3, "fp32", 1, 4000, 4000, 12000),
    # fp32, dp=4: ZeRO-1 splits the 12, ZeRO-2 also the grads, ZeRO-3 also the weights.
    (0, "fp32", 4, 4000, 4000, 8000),
    (1, "fp32", 4, 4000, 4000, 3000),
    (2, "fp32", 4, 4000, 1000, 3000),
    (3, "fp32", 4, 1000, 1000, 3000),
    # bf16: 2 + 2 + 12, the ZeRO paper's mixed-precision Adam.
    (0, "bf16", 1, 2000, 2000, 12000),
    (3, "bf16", 1, 2000, 2000, 12000),
    (0, "bf16", 4, 2000, 2000, 12000),
    (1, "bf16", 4, 2000, 2000, 3000),
    (2, "bf16", 4, 2000, 500, 3000),
    (3, "bf16", 4, 500, 500, 3000),
])
def test_estimate_by_hand(stage, precision, dp, params, grads, optimizer):
    est = estimate_memory(N, dp, stage, precision)
    assert est == MemoryEstimate(params=params, grads=grads, optimizer=optimizer)
    assert est.params_and_optimizer == params + optimizer


def test_estimate_rounds_partitions_up():
    # 1001 parameters over 4 ranks: each rank's slice is 251 elements.
    assert estimate_memory(1001, 4, 3, "bf16") == MemoryEstimate(params=502, grads=502, optimizer=3012)
    assert estimate_memory(0, 8, 3, "fp32") == MemoryEstimate(0, 0, 0)


@pytest.mark.parametrize("args", [(-1, 1, 0, "fp32"), (10, 0, 0, "fp32"), (10, 1, 4, "fp32"),
                                  (10, 1, 0, "fp16")])
def test_estimate_rejects_bad_arguments(args):
    with pytest.raises(ValueError):
        estimate_memory(*args)


def test_memory_lines_report_mib_and_ratio():
    est = MemoryEstimate(params=2 * 1024 * 1024, grads=1024 * 1024, optimizer=6 * 1024 * 1024)
    got = MemoryMeasure(params=2 * 1024 * 1024, optimizer=7 * 1024 * 1024)
    text = "\n".join(memory_lines(est, got))
    assert "weights+optimizer" in text and "MiB" in text
    assert "8.00 MiB" in text and "9.00 MiB" in text and "1.125" in text
    assert "gradients" in text
    assert "n/a" in "\n".join(memory_lines(MemoryEstimate(0, 0, 0), MemoryMeasure(0, 0)))


# ---------------------------------------------------------------------------------------------
# measure_memory on hand-built objects: storages counted once, whole, gradients ignored
# ---------------------------------------------------------------------------------------------

def test_measure_dedupes_storages_and_skips_grads():
    flat = torch.zeros(100)                          # one flat buffer, 400 bytes
    w = torch.nn.Parameter(flat[:60].view(6, 10))    # two params viewing it
    b = torch.nn.Parameter(flat[60:70])
    w.grad = torch.ones(6, 10)                       # gradients are not counted
    module = torch.nn.Module()
    module.w, module.b = w, b
    module.tied = w                                  # the same param reached twice
    opt = torch.optim.AdamW([w, b], lr=0.1, foreach=True)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    for p in (w, b):
        p.grad = None
    wrapper = SimpleNamespace(optimizer=opt)         # DeepSpeed-style wrapper around the torch one
    got = measure_memory(SimpleNamespace(module=module, optimizer=wrapper))
    assert got.params == 400                         # the whole flat storage, once
    # Model params are already counted; state: exp_avg + exp_avg_sq per param + 4-byte step each.
    assert got.optimizer == 2 * (60 + 10) * 4 + 2 * 4
    assert got.params_and_optimizer == 400 + got.optimizer


def test_measure_reads_masters_kept_by_wrappers_and_zero3_partitions():
    # ZeRO-3 shape: p.data is empty, the partition lives in ds_tensor; the basic optimizer's
    # param_groups are empty between steps and the master sits on the wrapper.
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_tensor = torch.zeros(50, dtype=torch.bfloat16)
    module = torch.nn.Module()
    module.p = p
    master = torch.zeros(50)
    basic = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    basic.param_groups[0]["params"] = []
    wrapper = SimpleNamespace(optimizer=basic, fp32_partitioned_groups_flat=[master])
    got = measure_memory(SimpleNamespace(module=module, optimizer=wrapper))
    assert got == MemoryMeasure(params=100, optimizer=200)


# ---------------------------------------------------------------------------------------------
# Real DeepSpeed engines on 1 and 2 gloo ranks: measured within 10% of the estimate
# ---------------------------------------------------------------------------------------------

CONFIGS = [(stage, precision) for stage in (0, 1, 2, 3) for precision in ("fp32", "bf16")]
TOLERANCE = 0.10




def _small_model() -> torch.nn.Module:
    # ~50k parameters: an embedding and a few 64x64 linears.
    return torch.nn.Sequential(torch.nn.Embedding(128, 64), *[torch.nn.Linear(64, 64) for _ in range(10)])


def _engine_after_one_step(world_size: int, stage: int, precision: str, zero_extra: dict):
    import deepspeed

    model = _small_model()
    n = sum(p.numel() for p in model.parameters())  # before ZeRO-3 empties p.data
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True)
    config = {
        "train_batch_size": world_size,
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": stage, **zero_extra},
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": precision == "bf16"},
    }
    if precision == "bf16" and stage >= 1:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    tokens = torch.randint(0, 128, (1, 8))
    loss = engine(tokens).float().pow(2).mean()
    engine.backward(loss)
    engine.step()  # Adam's m and v exist only after the first step
    return engine, n


def _measure_all_configs(rank: int, world_size: int, port: int) -> list[dict]:
    import logging

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    torch.manual_seed(0)
    rows = []
    # Under ZeRO-3 our tiny parameters are all below the default persistence threshold (1e5
    # elements), which would keep each one whole on every rank besides its partition; the
    # rule's runs switch that off, and one extra run with the default shows the effect.
    no_persist = {"stage3_param_persistence_threshold": 0}
    runs = [(stage, precision, no_persist if stage == 3 else {}) for stage, precision in CONFIGS]
    runs.append((3, "fp32", {}))
    for stage, precision, extra in runs:
        t0 = time.perf_counter()
        engine, n = _engine_after_one_step(world_size, stage, precision, extra)
        got = measure_memory(engine)
        rows.append(dict(stage=stage, precision=precision, extra=extra, n=n, seconds=time.perf_counter() - t0,
                         optimizer_class=type(engine.optimizer).__name__,
                         got=(got.params, got.optimizer)))
        engine.destroy()
    return rows


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 2])
def test_estimate_matches_deepspeed(world_size):
    per_rank = spawn_ranks(_measure_all_configs, world_size, free_ports(), timeout=240)
    failures, report = [], []
    for rank, rows in enumerate(per_rank):
        for row in rows:
            est = estimate_memory(row["n"], world_size, row["stage"], row["precision"])
            got = MemoryMeasure(*row["got"])
            ratio = got.params_and_optimizer / est.params_and_optimizer
            label = (f"rank {rank}/{world_size} ZeRO-{row['stage']} {row['precision']} "
                     f"{row['optimizer_class']} {row['extra'] or ''} ({row['seconds']:.1f} s)")
            report.append(f"{label}: ratio {ratio:.4f}\n  " + "\n  ".join(memory_lines(est, got)))
            if row["stage"] == 3 and not row["extra"]:
                # Default persistence: on more than one rank every (small) param is also held
                # whole, in fp32 here (on one rank the whole param is the partition).
                whole = 4 * row["n"] if world_size > 1 else 0
                assert got.params == pytest.approx(est.params + whole, rel=TOLERANCE), report[-1]
                continue
            if abs(ratio - 1) > TOLERANCE:
                failures.append(report[-1])
            # Each half agrees on its own, too: the rule is right, not two errors cancelling.
            assert got.params == pytest.approx(est.params, rel=TOLERANCE), report[-1]
            assert got.optimizer == pytest.approx(est.optimizer, rel=TOLERANCE), report[-1]
    print("\n".join(report))
    assert not failures, "\n".join(failures)
