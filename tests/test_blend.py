"""Blending several datasets: the schedule is a pure function, each source is read in its own
order without gaps, and the blended global order is layout-independent and resumable."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distlm.data.blend import BlendSchedule
from distlm.data.prepare import prepare_corpus
from distlm.data.shards import iter_shard_blocks, load_manifest
from distlm.data.stream import Source, TokenStream

SEQ_LEN = 8


# ---- the schedule alone ---------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=6), seed=st.integers(0, 2**31),
       first=st.integers(0, 10**7), count=st.integers(1, 3000))
def test_each_source_gets_consecutive_rows_and_counts_agree(weights, seed, first, count):
    schedule = BlendSchedule(weights, seed)
    source, row = schedule.locate(first, count)
    before = schedule.counts(first)
    for s in range(len(weights)):
        mine = row[source == s]
        np.testing.assert_array_equal(mine, before[s] + np.arange(len(mine)))
    np.testing.assert_array_equal(schedule.counts(first + count) - before,
                                  np.bincount(source, minlength=len(weights)))


@settings(max_examples=20, deadline=None)
@given(weights=st.lists(st.floats(0.001, 100.0), min_size=2, max_size=40), rounds=st.integers(1, 50))
def test_whole_rounds_match_the_weights_to_within_one_row(weights, rounds):
    schedule = BlendSchedule(weights, seed=0)
    n = rounds * schedule.round
    counts = schedule.counts(n)
    assert counts.sum() == n and np.all(counts >= 0)
    np.testing.assert_allclose(counts, n * np.asarray(weights) / sum(weights), atol=len(weights))


def test_the_schedule_is_a_pure_function_of_seed_and_position():
    a, b = BlendSchedule([3, 1], seed=5), BlendSchedule([3, 1], seed=5)
    # Asked in different pieces and orders, the same positions get the same sources.
    whole = a.locate(1000, 5000)
    pieces = [b.locate(p, 100) for p in range(1000, 6000, 100)]
    np.testing.assert_array_equal(whole[0], np.concatenate([p[0] for p in pieces]))
    np.testing.assert_array_equal(whole[1], np.concatenate([p[1] for p in pieces]))
    other = BlendSchedule([3, 1], seed=6).locate(1000, 5000)[0]
    assert not np.array_equal(whole[0], other)
    # Rows interleave: no run of one source is anywhere near a whole round long.
    runs = [len(list(g)) for _, g in itertools.groupby(whole[0].tolist())]
    assert max(runs) < 40


def test_a_single_source_is_the_identity():
    source, row = BlendSchedule([2.5], seed=1).locate(123, 4000)
    assert np.all(source == 0)
    np.testing.assert_array_equal(row, np.arange(123, 4123))


def test_bad_weights_and_bases_are_refused():
    for weights in ([], [0.0, 1.0], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="positive"):
            BlendSchedule(weights, seed=0)
    with pytest.raises(ValueError, match="one count"):
        BlendSchedule([1, 1], seed=0, base_counts=[3])
    with pytest.raises(ValueError, match="before this schedule's start"):
        BlendSchedule([1, 1], seed=0, base_row=10).locate(5, 2)


# ---- blended streams ------------------------------------------------------------------------


def _dataset(root, name, alphabet, n_docs, seed):
    rng = np.random.default_rng(seed)
    folder = root / f"{name}-text"
    folder.mkdir()
    for i in range(n_docs):
        n = int(rng.integers(60, 300))
        text = "".join(alphabet[j] for j in rng.integers(0, len(alphabet), size=n))
        (folder / f"{i:03d}.txt").write_text(text)
    out = root / name
    prepare_corpus([str(folder)], str(out), seq_len=SEQ_LEN, val_fraction=0.1, block_rows=5, shard_mb=0.005,
                   log=lambda _m: None)
    return out


def _natural(path):
    m = load_manifest(path)
    return np.concatenate([rows for s in m.split("train").shards
                           for _, rows in iter_shard_blocks(m.shard_path(s), dtype=m.np_dtype, row_len=m.row_len)])


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two datasets with disjoint alphabets, so every row tells which source it came from."""
    root = tmp_path_factory.mktemp("blend")
    a = _dataset(root, "a", "abcdefghijklm", 30, 1)
    b = _dataset(root, "b", "NOPQRSTUVWXYZ", 12, 2)
    return [Source(str(a), 3.0), Source(str(b), 1.0)]


def _from_b(rows):
    """Rows of source b: they hold upper-case letters (a row may start with EOS, shared by both)."""
    return ((rows >= ord("A")) & (rows <= ord("Z"))).any(axis=1)


def _rows(stream, n_batches):
    out = []
    for batch in itertools.islice(iter(stream), n_batches):
        x, y = batch.inputs, batch.targets
        out.append(np.concatenate([x.numpy(), y.numpy()[:, -1:]], axis=1))
    return np.concatenate(out)


def _global(sources, *, dp, m, n, **kw):
    per_rank = [_rows(TokenStream(sources, micro_batch_size=m, dp_rank=r, dp_size=dp, **kw), n) for r in range(dp)]
    return np.concatenate([per_rank[r][k * m:(k + 1) * m] for k in range(n) for r in range(dp)])


def test_blended_rows_follow_each_sources_own_order(two):
    stream = TokenStream(two, micro_batch_size=16, seed=4)
    rows = _rows(stream, 80)  # several epochs of the small source
    from_b = _from_b(rows)
    # The weights hold to within a round's rounding.
    assert abs(from_b.mean() - 0.25) < 0.03
    for s, mine in ((0, rows[~from_b]), (1, rows[from_b])):
        natural = _natural(two[s].path)
        order = stream.orders[s]
        epochs = -(-len(mine) // order.rows)
        expected = natural[np.concatenate([order.row_order(e) for e in range(epochs)])][: len(mine)]
        np.testing.assert_array_equal(mine, expected)
    assert stream.source_rows(80 * 16) == [int((~from_b).sum()), int(from_b.sum())]


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 1000), m=st.integers(1, 20), dp=st.sampled_from([2, 3]), start=st.integers(0, 3000))
def test_blended_order_is_the_same_for_any_data_parallel_size(two, seed, m, dp, start):
    n = 5
    split = _global(two, dp=dp, m=m, n=n, seed=seed, start_row=start)
    whole = _rows(TokenStream(two, micro_batch_size=m * dp, seed=seed, start_row=start), n)
    np.testing.assert_array_equal(split, whole)


def test_changed_weights_continue_every_source_from_its_counter(two):
    before = TokenStream(two, micro_batch_size=10, seed=1)
    rows_before = _rows(before, 30)
    counts = before.source_rows(300)
    reweighted = [Source(two[0].path, 1.0), Source(two[1].path, 1.0)]
    after = TokenStream(reweighted, micro_batch_size=10, seed=1, start_row=300, blend_base=(300, counts))
    rows_after = _rows(after, 30)
    assert abs(_from_b(rows_after).mean() - 0.5) < 0.1
    # Each source picks up exactly where it stopped: its rows after are its order's next ones.
    for s, is_s in ((0, lambda r: ~_from_b(r)), (1, _from_b)):
        order = after.orders[s]
        natural = _natural(two[s].path)
        full = natural[np.concatenate([order.row_order(e) for e in range(6)])]
        seen = np.concatenate([rows_before[is_s(rows_before)], rows_after[is_s(rows_after)]])
        np.testing.assert_array_equal(seen, full[: len(seen)])


def test_sources_must_agree_on_the_tokenizer(two, tmp_path):
    (tmp_path / "t.txt").write_text("hello world, " * 200)
    other = tmp_path / "char"
    prepare_corpus([str(tmp_path / "t.txt")], str(other), tokenizer="char", seq_len=SEQ_LEN, val_fraction=0,
                   log=lambda _m: None)
    with pytest.raises(ValueError, match="different tokenizers"):
        TokenStream([two[0], Source(str(other))], micro_batch_size=2)
    with pytest.raises(ValueError, match="distinct names"):
        TokenStream([two[0], Source(two[0].path)], micro_batch_size=2)


def test_reordering_sources_keeps_each_sources_order(two):
    ab = TokenStream(two, micro_batch_size=4, seed=8)
    ba = TokenStream(two[::-1], micro_batch_size=4, seed=8)
    np.testing.assert_array_equal(ab.orders[0].row_order(0), ba.orders[1].row_order(0))
    np.testing.assert_array_equal(ab.orders[1].row_order(1), ba.orders[0].row_order(1))


def _cfg(sources=None, path=None):
    from distlm.config import load_config

    if path is not None:
        return load_config(None, [f"data.path={path}"])
    items = ", ".join(f"{{path: {s.path}, weight: {s.weight}, name: {s.label}}}" for s in sources)
    return load_config(None, [f"data.sources=[{items}]"])


def test_a_single_source_run_grown_into_a_blend_continues_its_rows(two):
    """data.path=A for 200 rows, then data.sources=[A, B]: A goes on where it stopped, with the
    shuffle it had, so no row of A is read twice or skipped."""
    from distlm.config import data_sources
    from distlm.train.data import data_state, resume_plan

    alone = TokenStream(two[0].path, micro_batch_size=10, seed=3)
    read_before = _rows(alone, 20)
    saved = data_state(alone, 200)
    cfg = _cfg([two[0], two[1]])
    plan = resume_plan(cfg, saved, 200, log=lambda _m: None)
    assert plan.blend_base == (200, [200, 0]) and plan.seed_keys == {two[0].label: [3]}
    blend = TokenStream(data_sources(cfg.data), micro_batch_size=10, seed=3, start_row=200,
                        blend_base=plan.blend_base, seed_keys=plan.seed_keys)
    after = _rows(blend, 30)
    from_a = np.concatenate([read_before, after[~_from_b(after)]])
    natural = _natural(two[0].path)
    order = alone.orders[0]
    expected = natural[np.concatenate([order.row_order(e) for e in range(3)])][: len(from_a)]
    np.testing.assert_array_equal(from_a, expected)


def test_a_checkpoint_without_loader_state_cannot_become_a_blend(two):
    from distlm.config import ConfigError
    from distlm.train.data import resume_plan

    assert resume_plan(_cfg(path=two[0].path), {}, 200, log=print).blend_base is None
    with pytest.raises(ConfigError, match="predates data.sources"):
        resume_plan(_cfg([two[0], two[1]]), {}, 200, log=print)


def test_skipped_rows_carry_no_weight_in_the_step():
    import torch

    from distlm.data.stream import MicroBatch
    from distlm.train.step import valid_token_weights

    x = torch.zeros(4, 8, dtype=torch.int64)
    clean = MicroBatch(x, x, None)
    assert valid_token_weights([clean, clean]) == [1.0, 1.0]
    half = MicroBatch(x, x, {"rows_skipped": 2})
    full = MicroBatch(x, x, {"rows_skipped": 4})
    # 4 + 2 + 0 valid rows over 3 micro-batches: the step's loss is the mean over those 6 rows.
    assert valid_token_weights([clean, half, full]) == [2.0, 1.0, 0.0]
