"""The layout object: sizes, rank arithmetic (agreeing with DeepSpeed's topology), validation."""

from __future__ import annotations

import itertools

import pytest
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from distlm.parallel.layout import Layout, LayoutError, check_model_split, ranks_per_node_from_env

SIZES = list(itertools.product((1, 2, 4), (1, 2, 3), (1, 2)))


@pytest.mark.parametrize("tp, pp, dp", SIZES)
def test_rank_arithmetic_matches_deepspeed_topology(tp, pp, dp):
    layout = Layout.for_world(tp, pp, tp * pp * dp)
    assert layout.dp == dp and layout.world_size == tp * pp * dp
    topo = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp)
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        ds = topo.get_coord(rank)
        assert (c.stage, c.dp_rank, c.tp_rank) == (ds.pipe, ds.data, ds.model)
        assert layout.rank_of(c.stage, c.dp_rank, c.tp_rank) == rank
        assert sorted(layout.tp_ranks(rank)) == sorted(next(g for g in topo.get_axis_comm_lists("model") if rank in g)
                                                        if tp > 1 else [rank])
        assert sorted(layout.dp_ranks(rank)) == sorted(next(g for g in topo.get_axis_comm_lists("data") if rank in g)
                                                        if dp > 1 else [rank])
        # the three groups through a rank meet only in it
        assert set(layout.tp_ranks(rank)) & set(layout.dp_ranks(rank)) & set(layout.pp_ranks(rank)) == {rank}


def test_tensor_parallel_ranks_are_neighbours():
    layout = Layout.for_world(4, 2, 16)
    for rank in range(16):
        ranks = layout.tp_ranks(rank)
        assert max(ranks) - min(ranks) == 3  # one node of 4 (or 8) GPUs holds the whole group


@pytest.mark.parametrize("tp, pp, world, needle", [
    (2, 1, 3, "not divisible by parallel.tp x parallel.pp"),
    (2, 2, 6, "start a multiple of 4"),
    (0, 1, 2, "parallel.tp must be a positive integer"),
    (1, -1, 2, "parallel.pp must be a positive integer"),
])
def test_world_must_fit(tp, pp, world, needle):
    with pytest.raises(LayoutError, match=needle):
        Layout.for_world(tp, pp, world)


def test_tensor_parallel_group_may_not_span_nodes():
    with pytest.raises(LayoutError, match="span two nodes"):
        Layout.for_world(4, 1, 12, ranks_per_node=6)
    assert Layout.for_world(4, 1, 16, ranks_per_node=8).dp == 4


def test_ranks_per_node_from_launcher_env():
    assert ranks_per_node_from_env({"LOCAL_WORLD_SIZE": "8"}) == 8
    assert ranks_per_node_from_env({"SLURM_NTASKS_PER_NODE": "4"}) == 4
    assert ranks_per_node_from_env({"SLURM_NTASKS_PER_NODE": "2(x3)"}) is None  # heterogeneous: unknown
    assert ranks_per_node_from_env({}) is None


def _split(layout, **over):
    args = dict(n_heads=8, n_kv_heads=4, vocab_size=256, n_layers=4, mlp_hidden=512, uniform_stages=False)
    args.update(over)
    check_model_split(layout, **args)


@pytest.mark.parametrize("over, needle", [
    (dict(n_heads=6, n_kv_heads=6), "model.n_heads=6"),
    (dict(n_kv_heads=2), None),
    (dict(n_kv_heads=1), "model.n_kv_heads=1"),
    (dict(mlp_hidden=102), "MLP width"),
    (dict(vocab_size=257), "model.vocab_size=260"),
])
def test_what_tensor_parallelism_cuts_must_divide(over, needle):
    layout = Layout.for_world(4, 1, 4)
    if needle is None:
        _split(Layout.for_world(2, 1, 2), **over)
        return
    with pytest.raises(LayoutError, match=needle):
        _split(layout, **over)


def test_every_stage_needs_a_block():
    with pytest.raises(LayoutError, match="fewer than parallel.pp=8"):
        _split(Layout.for_world(1, 8, 8))
    with pytest.raises(LayoutError, match="uniform"):
        _split(Layout.for_world(1, 3, 3), uniform_stages=True)
    _split(Layout.for_world(1, 3, 3))  # balanced by parameters, 4 blocks over 3 stages is fine
