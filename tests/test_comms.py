"""Communication accounting: the counter on real gloo ranks (and under DeepSpeed), the minimum model."""

from __future__ import annotations

import os
import pickle
import sys
import types

import pytest
import torch

from distlm.parallel.comms import (CommsCounter, CommsModel, merge_snapshots, minimum_bytes, report_lines)
from spawn import spawn_ranks

F32 = 4


def _pairs(ranks: tuple[int, ...]) -> str:
    return {(0, 1): "pair", (2, 3): "pair", (0, 1, 2, 3): "world"}.get(ranks, "other")


def _collectives(rank: int, world_size: int):
    """Known collectives on 4 ranks; returns this rank's snapshot and the checks' facts."""
    import warnings

    import torch.distributed as dist
    c10d = dist.distributed_c10d
    from distlm.parallel.distributed import hand_to_deepspeed

    warnings.simplefilter("ignore", FutureWarning)  # all_gather_into_tensor & co. are "deprecated"
    n = world_size
    originals = {name: (getattr(dist, name), getattr(c10d, name))
                 for name in ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor", "send", "isend",
                              "all_gather_object", "batch_isend_irecv")}
    g01, g23 = dist.new_group([0, 1]), dist.new_group([2, 3])
    mine = g01 if rank < 2 else g23
    peer = rank ^ 1
    early_op = dist.P2POp(dist.isend if rank % 2 == 0 else dist.irecv, torch.zeros(3), peer)  # built before start

    counter = CommsCounter(classify=_pairs)
    with counter:
        with pytest.raises(RuntimeError):
            counter.start()
        assert dist.all_reduce is not originals["all_reduce"][0]
        # all_reduce of 10 fp32 in a 2-rank subgroup: S = 40, wire 2*(1/2)*40 = 40
        x = torch.full((10,), float(rank))
        dist.all_reduce(x, group=mine)
        assert x[0].item() == (0 + 1 if rank < 2 else 2 + 3)
        # all_gather_into_tensor: output 4*3 fp32 = 48 B, wire 3/4*48 = 36
        out = torch.zeros(n * 3)
        dist.all_gather_into_tensor(out, torch.full((3,), float(rank)))
        assert out.tolist() == [float(r) for r in range(n) for _ in range(3)]
        # reduce_scatter (list form) of 4 x 2 float64: S = 64, wire 48
        rs = torch.zeros(2, dtype=torch.float64)
        dist.reduce_scatter(rs, [torch.ones(2, dtype=torch.float64) for _ in range(n)])
        assert rs.tolist() == [4.0, 4.0]
        # reduce_scatter_tensor calls reduce_scatter_single inside: counted once. S = 32, wire 24
        dist.reduce_scatter_tensor(torch.zeros(2), torch.ones(2 * n))
        # send/recv of 5 int64 within the pair: the sender pays 40, the receiver 0
        buf = torch.arange(5)
        if rank % 2 == 0:
            dist.send(buf, dst=peer)
        else:
            got = torch.zeros(5, dtype=torch.int64)
            dist.recv(got, src=peer)
            assert got.tolist() == list(range(5))
        # async op: the work handle passes through
        y = torch.ones(4)
        work = dist.all_reduce(y, async_op=True)
        work.wait()
        assert y.tolist() == [4.0] * 4
        # object collective: one call, no payload, the inner tensor collectives not counted
        objs = [None] * n
        dist.all_gather_object(objs, {"rank": rank})
        assert [o["rank"] for o in objs] == list(range(n))
        # batched p2p: an op built before start and one built while counting (wrapped isend)
        late_op = dist.P2POp(dist.isend if rank % 2 == 1 else dist.irecv, torch.ones(2), peer)
        for w in dist.batch_isend_irecv([early_op, late_op]):
            w.wait()
        dist.barrier()
    snap = counter.snapshot()

    restored = all(getattr(dist, k) is v[0] and getattr(c10d, k) is v[1] for k, v in originals.items())
    # after stop nothing is counted any more
    dist.all_reduce(torch.ones(1))
    assert counter.snapshot() == snap
    counter.reset()
    assert counter.snapshot() == {}
    return {"snap": snap, "restored": restored, "errors": counter.record_errors}


@pytest.mark.distributed
def test_counter_counts_known_collectives_on_gloo_ranks():
    results = spawn_ranks(_collectives, 4, timeout=120)
    assert all(r["restored"] for r in results)
    assert all(r["errors"] == 0 for r in results)
    snaps = [r["snap"] for r in results]
    pickle.loads(pickle.dumps(snaps))

    s0, s1 = snaps[0], snaps[1]
    assert set(s0) == {"pair", "world"}
    assert s0["pair"]["all_reduce"] == {"calls": 1, "payload_bytes": 40, "wire_bytes": 40.0}
    w = s0["world"]
    assert w["all_gather_into_tensor"] == {"calls": 1, "payload_bytes": 48, "wire_bytes": 36.0}
    assert w["reduce_scatter"] == {"calls": 1, "payload_bytes": 64, "wire_bytes": 48.0}
    assert w["reduce_scatter_tensor"] == {"calls": 1, "payload_bytes": 32, "wire_bytes": 24.0}
    assert "reduce_scatter_single" not in w and "all_gather" not in w and "broadcast" not in w
    assert w["all_reduce"] == {"calls": 1, "payload_bytes": 16, "wire_bytes": 24.0}  # async one, 2*3/4*16
    assert w["all_gather_object"] == {"calls": 1, "payload_bytes": 0, "wire_bytes": 0.0}
    assert w["barrier"]["calls"] == 1
    # point to point: rank 0 sends (send 40 B, isend 12 B), rank 1 receives (and isends 8 B)
    assert s0["pair"]["send"] == {"calls": 1, "payload_bytes": 40, "wire_bytes": 40.0}
    assert s1["pair"]["recv"] == {"calls": 1, "payload_bytes": 40, "wire_bytes": 0.0}
    assert "isend" not in s1["pair"] or s1["pair"]["isend"]["payload_bytes"] == 8
    assert s0["pair"]["isend"] == {"calls": 1, "payload_bytes": 12, "wire_bytes": 12.0}
    assert s0["pair"]["irecv"] == {"calls": 1, "payload_bytes": 8, "wire_bytes": 0.0}
    assert s1["pair"]["isend"] == {"calls": 1, "payload_bytes": 8, "wire_bytes": 8.0}
    assert s1["pair"]["irecv"] == {"calls": 1, "payload_bytes": 12, "wire_bytes": 0.0}

    merged = merge_snapshots(snaps)
    assert merged["world"]["all_gather_into_tensor"] == {"calls": 4, "payload_bytes": 192, "wire_bytes": 144.0}
    assert merged["pair"]["send"]["wire_bytes"] == 80.0 and merged["pair"]["recv"]["wire_bytes"] == 0.0
    assert merged["pair"]["all_reduce"]["calls"] == 4


def test_start_stop_restores_every_patched_name(monkeypatch):
    import torch.distributed as dist
    c10d = dist.distributed_c10d
    alias = types.ModuleType("distlm._comms_alias_probe")
    alias.all_reduce = dist.all_reduce  # as `from torch.distributed import all_reduce` would
    monkeypatch.setitem(sys.modules, alias.__name__, alias)
    before = {(m, k): v for m in (dist, c10d) for k, v in vars(m).items() if callable(v)}

    counter = CommsCounter()
    counter.start()
    try:
        assert alias.all_reduce is not before[(dist, "all_reduce")]
        assert c10d.all_reduce is before[(c10d, "all_reduce")]  # compared by identity inside torch
        assert c10d.all_gather_into_tensor is not before[(c10d, "all_gather_into_tensor")]
        assert dist.isend == before[(dist, "isend")]  # P2POp's `op in [isend, irecv]` check passes
        with pytest.raises(RuntimeError, match="already active"):
            counter.start()
    finally:
        counter.stop()
    after = {(m, k): v for m in (dist, c10d) for k, v in vars(m).items() if callable(v)}
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] for k in before)
    assert alias.all_reduce is before[(dist, "all_reduce")]
    assert counter.snapshot() == {}

    # an object that kept a wrapper while a counter ran (as DeepSpeed's backend does when it is
    # built then) still gets counted by the next counter, and gets its kept value back
    with CommsCounter() as first:
        alias.kept = dist.all_gather_into_tensor
    stale = alias.kept
    assert stale._counter is first and stale == before[(dist, "all_gather_into_tensor")]
    with CommsCounter() as second:
        assert alias.kept._counter is second and alias.kept._orig is before[(dist, "all_gather_into_tensor")]
    assert alias.kept is stale
    counter.start()  # restartable after stop
    counter.stop()


def _deepspeed_zero1(rank: int, world_size: int):
    """Two tiny ZeRO-1 engines (default, then per-partition reduce), one counted step each."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    import logging
    import warnings
    from datetime import timedelta

    import deepspeed
    import deepspeed.comm.comm as ds_comm
    import torch.distributed as dist

    from distlm.parallel.distributed import hand_to_deepspeed

    warnings.simplefilter("ignore", FutureWarning)
    deepspeed.utils.logger.setLevel(logging.WARNING)
    hand_to_deepspeed(timedelta(minutes=5))  # reuses the group spawn_ranks made
    original_ag = ds_comm.cdb.all_gather_function
    out = {}
    for name, extra in (("default", {}), ("reduce", {"use_multi_rank_bucket_allreduce": False})):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 16)  # 272 parameters, fp32
        engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
            config={"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1,
                    "zero_optimization": {"stage": 1, **extra}, "zero_allow_untested_optimizer": True})
        with CommsCounter(classify=lambda ranks: "dp" if ranks == (0, 1) else "other") as counter:
            loss = engine(torch.randn(1, 16)).pow(2).mean()
            engine.backward(loss)
            backward = counter.snapshot()
            engine.step()
        out[name] = {"backward": backward, "step": counter.snapshot(), "errors": counter.record_errors}
    out["restored"] = ds_comm.cdb.all_gather_function is original_ag is dist.all_gather_into_tensor
    return out


@pytest.mark.distributed
def test_counter_sees_deepspeed_zero1_reduction_and_all_gather():
    results = spawn_ranks(_deepspeed_zero1, 2, timeout=180)
    G = P = 272 * F32
    for r in results:
        assert r["restored"]
        default, reduce = r["default"], r["reduce"]
        assert default["errors"] == reduce["errors"] == 0
        # default: the gradients are ALL-REDUCED in backward (2(n-1)/n * G), not reduce-scattered
        assert default["backward"] == {"dp": {"all_reduce": {"calls": 1, "payload_bytes": G, "wire_bytes": float(G)}}}
        ag = default["step"]["dp"]["all_gather_into_tensor"]  # via cdb.all_gather_function
        assert ag == {"calls": 1, "payload_bytes": P, "wire_bytes": P / 2}
        # use_multi_rank_bucket_allreduce=false: one reduce per partition owner: wire = reduce-scatter's
        red = reduce["backward"]["dp"]["reduce"]
        assert red == {"calls": 2, "payload_bytes": G, "wire_bytes": G / 2}
        assert reduce["step"]["dp"]["all_gather_into_tensor"]["payload_bytes"] == P

    minimum = minimum_bytes(tp=1, pp=1, dp=2, zero_stage=1, n_layers=0, d_model=16, vocab_size=16,
                            micro_batch=1, seq_len=1, grad_accum=1, stage_params=[272],
                            activation_bytes=4, grad_bytes=4, param_bytes=4, tied_embeddings=False)
    assert minimum == CommsModel(tp=0.0, dp=float(G + P), pp=0.0)

    def dp_wire(snap):
        return sum(v["wire_bytes"] for v in snap["dp"].values())
    merged_default = merge_snapshots([r["default"]["step"] for r in results])
    merged_reduce = merge_snapshots([r["reduce"]["step"] for r in results])
    scalar = 2 * 4.0  # each rank's 4-byte overflow all-reduce in step(): 2*(1/2)*4 B
    assert dp_wire(merged_reduce) == minimum.dp + scalar
    assert dp_wire(merged_default) == 1.5 * minimum.dp + scalar
    lines = report_lines(merged_default, minimum, steps=1)
    dp_line = next(l for l in lines if l.strip().startswith("dp"))
    assert "ratio 1.50x" in dp_line
    assert any("all_gather_into_tensor" in l and "2.0 calls/step" in l for l in lines)  # 1 per rank


# ---- the minimum, by hand ------------------------------------------------------------------------

BASE = dict(n_layers=1, d_model=4, vocab_size=8, micro_batch=1, seq_len=2, grad_accum=1,
            activation_bytes=F32, grad_bytes=F32, param_bytes=F32)


def test_minimum_tensor_parallel_one_layer():
    # A = 1*2*4*4 = 32 B. 4 all-reduces per layer + embedding fwd + head-input bwd = 6, plus the
    # cross-entropy's 3 all-reduces of b*s fp32 = 8 B; an all-reduce of X over 2 ranks moves 2*X.
    m = minimum_bytes(tp=2, pp=1, dp=1, zero_stage=0, stage_params=[50], **BASE)
    assert m == CommsModel(tp=2 * (6 * 32 + 3 * 8), dp=0.0, pp=0.0)
    assert minimum_bytes(tp=2, pp=1, dp=1, zero_stage=0, stage_params=[50], sequence_parallel=True, **BASE) == m
    ckpt = minimum_bytes(tp=2, pp=1, dp=1, zero_stage=0, stage_params=[50], activation_checkpointing=True, **BASE)
    assert ckpt.tp == 2 * (7 * 32 + 3 * 8)  # recomputation repeats the attention's forward all-reduce
    # tp=4, dp=3, 4 micro-batches: 2*(4-1)*X per all-reduce, 3 groups, 4 times
    big = minimum_bytes(tp=4, pp=1, dp=3, zero_stage=0, stage_params=[0], **{**BASE, "grad_accum": 4})
    assert big.tp == 3 * 4 * 6 * (6 * 32 + 3 * 8)
    assert minimum_bytes(tp=1, pp=1, dp=1, zero_stage=0, stage_params=[50], **BASE).tp == 0


def test_minimum_data_parallel_zero_stages():
    kw = dict(BASE, tp=1, pp=1, dp=2, stage_params=[100], param_bytes=2, grad_accum=3)
    G, P = 400, 200  # per rank; factor (dp-1)/dp = 1/2, times 2 ranks
    assert minimum_bytes(zero_stage=0, **kw).dp == 2 * (2 * 0.5 * G)
    assert minimum_bytes(zero_stage=1, **kw).dp == 2 * (0.5 * (G + P))
    assert minimum_bytes(zero_stage=2, **kw).dp == 2 * (0.5 * (3 * G + P))
    assert minimum_bytes(zero_stage=3, **kw).dp == 2 * (0.5 * 3 * (2 * P + G))
    # two stages of different size, tp=2: every rank of a stage pays its own stage's share
    two = minimum_bytes(zero_stage=1, **dict(kw, tp=2, pp=2, stage_params=[100, 60]))
    assert two.dp == 2 * 2 * 0.5 * ((400 + 200) + (240 + 120))


def test_minimum_pipeline_boundaries_and_tied_embedding():
    kw = dict(BASE, dp=1, zero_stage=0, stage_params=[10, 10], activation_bytes=2, grad_accum=4)
    A = 1 * 2 * 4 * 2  # 16 B
    untied = minimum_bytes(tp=1, pp=2, tied_embeddings=False, **kw)
    assert untied.pp == 2 * 4 * A  # forward + backward, 1 boundary, 4 micro-batches
    tied = minimum_bytes(tp=1, pp=2, **kw)
    assert tied.pp == untied.pp + 2 * (8 * 4 * F32)  # two ranks each send V*h*grad_bytes once
    # tp=2, partitioned (DeepSpeed's default): one A crosses, the receiving tp group gathers it
    part = minimum_bytes(tp=2, pp=2, tied_embeddings=False, **kw)
    assert part.pp == 2 * 4 * A
    assert part.tp == minimum_bytes(tp=2, pp=1, tied_embeddings=False, **dict(kw, stage_params=[10])).tp \
        + 2 * 4 * (2 - 1) * A
    # unpartitioned: each tp rank sends its own copy; with SP only its shard, and nothing to gather
    assert minimum_bytes(tp=2, pp=2, tied_embeddings=False, pipe_partitioned=False, **kw).pp == 2 * 4 * 2 * A
    assert minimum_bytes(tp=2, pp=2, tied_embeddings=False, sequence_parallel=True, **kw).pp == 2 * 4 * A
    assert minimum_bytes(tp=2, pp=2, **kw).pp == 2 * 4 * A + 2 * 2 * (8 / 2) * 4 * F32
    assert minimum_bytes(tp=1, pp=1, **dict(kw, stage_params=[10])).pp == 0
    with pytest.raises(ValueError):
        minimum_bytes(tp=1, pp=2, **dict(kw, stage_params=[10]))


def test_merge_snapshots_and_report_lines():
    a = {"dp": {"all_reduce": {"calls": 1, "payload_bytes": 100, "wire_bytes": 100.0}}}
    b = {"dp": {"all_reduce": {"calls": 2, "payload_bytes": 50, "wire_bytes": 50.0}},
         "other": {"barrier": {"calls": 1, "payload_bytes": 0, "wire_bytes": 0.0}}}
    m = merge_snapshots([a, b])
    assert m == {"dp": {"all_reduce": {"calls": 3, "payload_bytes": 150, "wire_bytes": 150.0}},
                 "other": {"barrier": {"calls": 1, "payload_bytes": 0, "wire_bytes": 0.0}}}
    assert a["dp"]["all_reduce"]["calls"] == 1  # inputs untouched
    lines = report_lines(m, CommsModel(tp=0.0, dp=75.0, pp=0.0), steps=2)
    dp_line = next(l for l in lines if l.strip().startswith("dp"))
    assert "ratio 1.00x" in dp_line
    assert any(l.strip().startswith("other") and "minimum" in l for l in lines)
    assert any("all_reduce" in l and "1.5 calls/step" in l for l in lines)
    assert lines[-1].strip().startswith("total")
