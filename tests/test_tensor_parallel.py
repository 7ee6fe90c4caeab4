"""Tensor-parallel layers against their plain torch counterparts.

The distributed checks run once per world size in real gloo processes (a module fixture; each
spawn costs seconds) and return their measured errors; the tests below assert on them. Every
rank builds the same full weights and inputs from a fixed seed, keeps its shard, and compares
the gathered results with nn.Linear / nn.Embedding / F.cross_entropy on the full tensors, in
float64 so the tolerances can be tight.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from distlm.parallel.tensor import (
    ColumnParallelLinear, RowParallelLinear, TPGroup, TPRandom, VocabParallelEmbedding, copy_to_tp,
    full_shape, gather_from_sequence, gather_from_tp_last_dim, reduce_from_tp, reduce_scatter_to_sequence,
    scatter_to_sequence, shard, vocab_parallel_cross_entropy)

from spawn import spawn_ranks

TOL = 1e-10
B, S, D, H, V = 2, 8, 8, 16, 16  # S, H, V divisible by 2 and 4


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def _gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts, dim)


def _mlp_errors(tp: TPGroup) -> dict:
    """Column -> GELU -> Row against two nn.Linear built from the same full weights."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    up = torch.randn(B, S, D, generator=g, dtype=torch.float64)  # upstream gradient
    lin1, lin2 = nn.Linear(D, H).double(), nn.Linear(H, D).double()
    with torch.no_grad():
        for p in (*lin1.parameters(), *lin2.parameters()):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x_ref = x.clone().requires_grad_()
    y_ref = lin2(F.gelu(lin1(x_ref)))
    (y_ref * up).sum().backward()

    col = ColumnParallelLinear(D, H, True, tp, dtype=torch.float64)
    row = RowParallelLinear(H, D, True, tp, dtype=torch.float64)
    with torch.no_grad():
        col.weight.copy_(shard(lin1.weight, 0, tp))
        col.bias.copy_(shard(lin1.bias, 0, tp))
        row.weight.copy_(shard(lin2.weight, 1, tp))
        row.bias.copy_(lin2.bias)
    if tp.sequence_parallel:
        x_in, up_in = shard(x, 1, tp).requires_grad_(), shard(up, 1, tp)
    else:
        x_in, up_in = x.clone().requires_grad_(), up
    y = row(F.gelu(col(x_in)))
    (y * up_in).sum().backward()
    if tp.sequence_parallel:
        y, x_grad = _gather(y, 1), _gather(x_in.grad, 1)
    else:
        x_grad = x_in.grad
    return {"out": _err(y, y_ref), "x_grad": _err(x_grad, x_ref.grad),
            "col_w": _err(_gather(col.weight.grad, 0), lin1.weight.grad),
            "col_b": _err(_gather(col.bias.grad, 0), lin1.bias.grad),
            "row_w": _err(_gather(row.weight.grad, 1), lin2.weight.grad),
            "row_b": _err(row.bias.grad, lin2.bias.grad)}


def _embedding_errors(tp: TPGroup) -> dict:
    g = torch.Generator().manual_seed(1)
    ref = nn.Embedding(V, D).double()
    with torch.no_grad():
        ref.weight.copy_(torch.randn(V, D, generator=g, dtype=torch.float64))
    part = V // tp.size
    edges = [0, V - 1] + [k * part + d for k in range(1, tp.size) for d in (-1, 0)]  # shard boundaries
    ids = torch.randint(0, V, (B, S), generator=g)
    ids.view(-1)[:len(edges)] = torch.tensor(edges)
    up = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    out_ref = ref(ids)
    (out_ref * up).sum().backward()

    emb = VocabParallelEmbedding(V, D, tp, dtype=torch.float64)
    with torch.no_grad():
        emb.weight.copy_(shard(ref.weight, 0, tp))
    out = emb(ids)
    if tp.sequence_parallel:
        (out * shard(up, 1, tp)).sum().backward()
        out = _gather(out, 1)
    else:
        (out * up).sum().backward()
    return {"out": _err(out, out_ref), "w_grad": _err(_gather(emb.weight.grad, 0), ref.weight.grad)}


def _cross_entropy_errors(tp: TPGroup, scale: float) -> dict:
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(B, S, V, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, V, (B, S), generator=g)
    part = V // tp.size
    targets[0, :4] = torch.tensor([0, part - 1, part, V - 1])
    targets[1, ::3] = -100
    up = torch.rand(B, S, generator=g, dtype=torch.float64)
    full = logits.clone().requires_grad_()
    loss_ref = F.cross_entropy(full.view(-1, V), targets.view(-1), reduction="none", ignore_index=-100).view(B, S)
    (loss_ref * up).sum().backward()

    local = shard(logits, 2, tp).requires_grad_()
    loss = vocab_parallel_cross_entropy(local, targets, tp)
    (loss * up).sum().backward()
    return {"loss": _err(loss, loss_ref), "grad": _err(_gather(local.grad, 2), full.grad),
            "finite": bool(torch.isfinite(loss).all()), "ignored_zero": bool((loss[targets == -100] == 0).all())}


def _collective_errors(tp: TPGroup) -> dict:
    """The sequence collectives and the last-dim gather, forward and backward, against the full tensor."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    up = torch.randn(B, S, D, generator=g, dtype=torch.float64)
    errs = {}
    # scatter then gather is the identity; the gradient through both is the upstream one.
    xi = x.clone().requires_grad_()
    y = gather_from_tp_last_dim(scatter_to_sequence(xi, tp, dim=-1), tp)
    (y * up).sum().backward()
    errs["scatter_gather_last"] = max(_err(y, x), _err(xi.grad, up))
    # reduce-scatter of (rank+1)*x along dim 1 is sum(r+1) * x's chunk.
    xi = (x * (tp.rank + 1)).requires_grad_()
    y = reduce_scatter_to_sequence(xi, tp, dim=1)
    (y * shard(up, 1, tp)).sum().backward()
    total = sum(range(1, tp.size + 1))
    errs["reduce_scatter"] = max(_err(y, shard(x, 1, tp) * total), _err(xi.grad, up))
    # gather along dim 1: backward reduce-scatters, so each chunk's gradient is tp * upstream.
    xi = shard(x, 1, tp).requires_grad_()
    y = gather_from_sequence(xi, tp, dim=1)
    (y * up).sum().backward()
    errs["gather_seq"] = max(_err(y, x), _err(xi.grad, shard(up, 1, tp) * tp.size))
    # copy / reduce: gradient of copy_to_tp is summed, reduce_from_tp sums forward.
    xi = x.clone().requires_grad_()
    y = reduce_from_tp(copy_to_tp(xi, tp) * (tp.rank + 1), tp)
    (y * up).sum().backward()
    errs["copy_reduce"] = max(_err(y, x * total), _err(xi.grad, up * total))
    return errs


def _random_checks(rank: int) -> dict:
    torch.manual_seed(1234)  # the same default stream on every tp rank
    rnd = TPRandom(seed=100 + rank, device=torch.device("cpu"))
    ones = torch.ones(256)
    before = F.dropout(ones, 0.5)
    state = torch.get_rng_state()
    with rnd.fork():
        inside = F.dropout(ones, 0.5)
    restored = torch.equal(torch.get_rng_state(), state)
    after = F.dropout(ones, 0.5)
    masks = [_gather(m.unsqueeze(0), 0) for m in (before, inside, after)]
    return {"restored": restored, "before_same": torch.equal(masks[0][0], masks[0][1]),
            "inside_differs": not torch.equal(masks[1][0], masks[1][1]),
            "after_same": torch.equal(masks[2][0], masks[2][1])}


def _worker(rank: int, world_size: int) -> dict:
    torch.manual_seed(0)
    tp = TPGroup(group=dist.new_group(list(range(world_size))), size=world_size, rank=rank)
    sp = TPGroup(group=tp.group, size=world_size, rank=rank, sequence_parallel=True)
    col, row, emb = ColumnParallelLinear(D, H, True, tp), RowParallelLinear(H, D, True, tp), VocabParallelEmbedding(V, D, tp)
    attrs = {name: (getattr(p, "tensor_model_parallel", False), getattr(p, "partition_dim", None),
                    getattr(p, "partition_stride", None), tuple(full_shape(p)))
             for name, p in [("col.weight", col.weight), ("col.bias", col.bias), ("row.weight", row.weight),
                             ("row.bias", row.bias), ("emb.weight", emb.weight)]}
    return {"mlp": _mlp_errors(tp), "mlp_sp": _mlp_errors(sp),
            "emb": _embedding_errors(tp), "emb_sp": _embedding_errors(sp),
            "ce": _cross_entropy_errors(tp, 3.0), "ce_large": _cross_entropy_errors(tp, 1e4),
            "collectives": _collective_errors(tp), "attrs": attrs,
            "random": _random_checks(rank) if world_size == 2 else None}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"tp{n}")
def ranks(request):
    return request.param, spawn_ranks(_worker, request.param, timeout=120)


def _assert_small(results: list, key: str) -> None:
    for rank, r in enumerate(results):
        for what, err in r[key].items():
            assert err < TOL, f"rank {rank}: {key}.{what} differs by {err}"


@pytest.mark.distributed
@pytest.mark.parametrize("key", ["mlp", "mlp_sp", "emb", "emb_sp", "collectives"])
def test_matches_unsharded(ranks, key):
    _, results = ranks
    _assert_small(results, key)


@pytest.mark.distributed
@pytest.mark.parametrize("key", ["ce", "ce_large"])
def test_vocab_parallel_cross_entropy(ranks, key):
    _, results = ranks
    for rank, r in enumerate(results):
        res = dict(r[key])
        assert res.pop("finite") and res.pop("ignored_zero"), f"rank {rank}: {key}"
        for what, err in res.items():
            assert err < TOL, f"rank {rank}: {key}.{what} differs by {err}"


@pytest.mark.distributed
def test_sharded_parameter_attributes(ranks):
    n, results = ranks
    for r in results:
        a = r["attrs"]
        assert a["col.weight"] == (True, 0, 1, (H, D))
        assert a["col.bias"] == (True, 0, 1, (H,))
        assert a["row.weight"] == (True, 1, 1, (D, H))
        assert a["emb.weight"] == (True, 0, 1, (V, D))
        assert a["row.bias"] == (False, None, None, (D,))  # replicated: counted once by DeepSpeed


@pytest.mark.distributed
def test_tp_random_across_ranks(ranks):
    n, results = ranks
    if n != 2:
        pytest.skip("checked at tp=2")
    for r in results:
        assert r["random"] == {"restored": True, "before_same": True, "inside_differs": True, "after_same": True}


# ---------------------------------------------------------------------------------------------
# In-process: size 1 needs no process group at all.


def test_size_one_is_plain_torch_without_process_group():
    assert not dist.is_initialized()
    tp = TPGroup.single()
    x = torch.randn(B, S, D, dtype=torch.float64)
    for fn in (copy_to_tp, reduce_from_tp, gather_from_tp_last_dim):
        assert fn(x, tp) is x
    for fn in (scatter_to_sequence, gather_from_sequence, reduce_scatter_to_sequence):
        assert fn(x, tp) is x

    col = ColumnParallelLinear(D, H, True, tp, dtype=torch.float64)
    row = RowParallelLinear(H, D, False, tp, dtype=torch.float64)
    emb = VocabParallelEmbedding(V, D, tp, dtype=torch.float64)
    for p in (*col.parameters(), *row.parameters(), *emb.parameters()):
        nn.init.normal_(p)
    assert shard(col.weight, 0, tp).equal(col.weight)
    assert row(col(x)).equal(F.linear(F.linear(x, col.weight, col.bias), row.weight))
    ids = torch.randint(0, V, (B, S))
    assert emb(ids).equal(F.embedding(ids, emb.weight))

    logits = torch.randn(B, S, V, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, V, (B, S))
    targets[0, 0] = -100
    loss = vocab_parallel_cross_entropy(logits, targets, tp)
    ref = F.cross_entropy(logits.view(-1, V), targets.view(-1), reduction="none").view(B, S)
    assert _err(loss, ref) < TOL
    (g,) = torch.autograd.grad(loss.sum(), logits)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    assert _err(g, g_ref) < TOL


def test_cross_entropy_low_precision_logits():
    tp = TPGroup.single()
    logits = (torch.randn(B, S, V) * 5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, V, (B, S))
    loss = vocab_parallel_cross_entropy(logits, targets, tp)
    assert loss.dtype == torch.float32
    ref = F.cross_entropy(logits.float().view(-1, V), targets.view(-1), reduction="none").view(B, S)
    assert _err(loss, ref) < 1e-5
    loss.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="disagree"):
        vocab_parallel_cross_entropy(logits, targets[:, :-1], tp)


def test_divisibility_errors():
    # A stand-in group: constructors only read size and rank, they never communicate.
    tp = TPGroup(group=object(), size=4, rank=1)
    with pytest.raises(ValueError, match="out_features=10 is not divisible by tensor-parallel size 4"):
        ColumnParallelLinear(8, 10, True, tp)
    with pytest.raises(ValueError, match="in_features=6 is not divisible by tensor-parallel size 4"):
        RowParallelLinear(6, 8, True, tp)
    with pytest.raises(ValueError, match="num_embeddings=30 is not divisible by tensor-parallel size 4"):
        VocabParallelEmbedding(30, 8, tp)
    with pytest.raises(ValueError, match="not divisible"):
        shard(torch.zeros(6, 3), 0, tp)
    assert shard(torch.arange(8).view(8, 1), 0, tp).view(-1).tolist() == [2, 3]
    with pytest.raises(ValueError, match="needs its process group"):
        TPGroup(group=None, size=2, rank=0)
    with pytest.raises(ValueError, match="rank 2 of size 2"):
        TPGroup(group=object(), size=2, rank=2)


def test_tp_random_fork_restores_and_persists():
    torch.manual_seed(0)
    ones = torch.ones(512)
    rnd = TPRandom(seed=7, device=torch.device("cpu"))
    state = torch.get_rng_state()
    with rnd.fork():
        first = F.dropout(ones, 0.5)
    assert torch.equal(torch.get_rng_state(), state)  # the default stream is untouched
    saved = rnd.state_dict()
    with rnd.fork():
        second = F.dropout(ones, 0.5)
    assert not torch.equal(first, second)  # the forked stream moved on
    # weights_only-loadable, and restoring replays the same masks
    import io
    buf = io.BytesIO()
    torch.save(saved, buf)
    buf.seek(0)
    rnd.load_state_dict(torch.load(buf, weights_only=True))
    with rnd.fork():
        assert torch.equal(F.dropout(ones, 0.5), second)
    # the same seed gives the same stream, whatever the default generator did meanwhile
    torch.manual_seed(99)
    with TPRandom(seed=7, device=torch.device("cpu")).fork():
        assert torch.equal(F.dropout(ones, 0.5), first)
    with pytest.raises(RuntimeError, match="does not nest"):
        with rnd.fork(), rnd.fork():
            pass
