import itertools
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from distlm.data import shards as shards_mod
from distlm.data.prepare import prepare_corpus
from distlm.data.shards import ShardError, iter_shard_blocks, load_manifest
from distlm.data.stream import TokenStream, make_loader

SEQ_LEN = 8


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """~800 train rows in 5-row blocks spread over several shards; random letters make rows unique."""
    root = tmp_path_factory.mktemp("stream")
    rng = np.random.default_rng(7)
    for i in range(30):
        n = int(rng.integers(50, 400))
        letters = rng.integers(ord("a"), ord("z") + 1, size=n).astype(np.uint8).tobytes().decode()
        (root / f"doc{i:02d}.txt").write_text(letters)
    out = root / "data"
    prepare_corpus([str(root)], str(out), seq_len=SEQ_LEN, val_fraction=0.1, block_rows=5,
                   shard_mb=0.01, log=lambda _m: None)
    m = load_manifest(out)
    train = m.split("train")
    # Several shards, and windows of the default 8 blocks that straddle shard boundaries.
    assert len(train.shards) >= 4 and len(train.shards[0].block_rows) % 8 != 0
    assert train.rows > 300
    return out


@pytest.fixture(scope="module")
def natural(data_dir):
    """All train rows in manifest (natural) order, [R, SEQ_LEN + 1]."""
    m = load_manifest(data_dir)
    return np.concatenate([
        rows
        for s in m.split("train").shards
        for _, rows in iter_shard_blocks(m.shard_path(s), dtype=m.np_dtype, row_len=m.row_len)
    ]).astype(np.int64)


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def rows_of(batches):
    """Rebuild full rows [n, SEQ_LEN + 1] from (x, y) batches."""
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert torch.equal(x[:, 1:], y[:, :-1])
    return torch.cat([x, y[:, -1:]], dim=1).numpy()


def global_rows(data_dir, *, dp, m, n_batches, start_row=0, **kw):
    """The rows of global micro-batches 0..n_batches-1: every rank's slice, concatenated in rank order."""
    per_rank = [
        take(iter(TokenStream(data_dir, micro_batch_size=m, dp_rank=r, dp_size=dp, start_row=start_row, **kw)),
             n_batches)
        for r in range(dp)
    ]
    return np.concatenate([rows_of([per_rank[r][k] for r in range(dp)]) for k in range(n_batches)])


def test_batches_have_the_right_shape_and_shift(data_dir, natural):
    x, y, _ = next(iter(TokenStream(data_dir, micro_batch_size=4, shuffle=False)))
    assert x.dtype == torch.int64 and x.shape == (4, SEQ_LEN) and y.shape == (4, SEQ_LEN)
    np.testing.assert_array_equal(x.numpy(), natural[:4, :SEQ_LEN])
    np.testing.assert_array_equal(y.numpy(), natural[:4, 1:])


def test_shorter_seq_len_truncates_longer_raises(data_dir, natural):
    x, y, _ = next(iter(TokenStream(data_dir, micro_batch_size=3, shuffle=False, seq_len=5)))
    np.testing.assert_array_equal(x.numpy(), natural[:3, :5])
    np.testing.assert_array_equal(y.numpy(), natural[:3, 1:6])
    with pytest.raises(ValueError, match="seq_len 9 is not in 1..8"):
        TokenStream(data_dir, micro_batch_size=3, seq_len=9)


def test_no_shuffle_is_natural_order_repeating(data_dir, natural):
    R = len(natural)
    got = rows_of(take(iter(TokenStream(data_dir, micro_batch_size=37, shuffle=False)), (2 * R) // 37 + 2))
    np.testing.assert_array_equal(got[: 2 * R], np.concatenate([natural, natural]))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 2**31), shuffle_blocks=st.sampled_from([1, 3, 8, 1000]), m=st.integers(5, 60))
def test_each_epoch_is_a_permutation_of_all_rows(data_dir, natural, seed, shuffle_blocks, m):
    stream = TokenStream(data_dir, micro_batch_size=m, seed=seed, shuffle_blocks=shuffle_blocks)
    R = stream.rows_per_epoch
    orders = [stream.row_order(e) for e in range(2)]
    for order in orders:
        np.testing.assert_array_equal(np.sort(order), np.arange(R))
    assert not np.array_equal(orders[0], orders[1])  # epochs reshuffle
    got = rows_of(take(iter(stream), (2 * R) // m + 1))
    np.testing.assert_array_equal(got[: 2 * R], natural[np.concatenate(orders)][: len(got)])


def test_shuffle_moves_shards_whole_and_rows_only_within_windows(data_dir):
    m = load_manifest(data_dir)
    shards = m.split("train").shards
    # With one block per window, an epoch is: shards in some order, their blocks in order,
    # and each block's rows permuted among themselves.
    order = TokenStream(data_dir, micro_batch_size=1, seed=3, shuffle_blocks=1).row_order(0)
    starts = np.cumsum([0] + [r for s in shards for r in s.block_rows])
    block_of = np.searchsorted(starts, order, side="right") - 1
    visited, pos = [], 0
    while pos < len(order):
        b = block_of[pos]
        n = starts[b + 1] - starts[b]
        assert sorted(order[pos:pos + n]) == list(range(starts[b], starts[b + 1]))
        visited.append(b)
        pos += n
    first_block = np.cumsum([0] + [len(s.block_rows) for s in shards])
    runs, i = [], 0
    while i < len(visited):
        shard = int(np.searchsorted(first_block, visited[i], side="right") - 1)
        n = len(shards[shard].block_rows)
        assert visited[i:i + n] == list(range(first_block[shard], first_block[shard] + n))
        runs.append(shard)
        i += n
    assert sorted(runs) == list(range(len(shards))) and runs != sorted(runs)


def test_rows_reshuffle_every_epoch_even_with_one_shard(tmp_path):
    (tmp_path / "a.txt").write_text("".join(chr(97 + (i * 7) % 26) for i in range(3000)))
    prepare_corpus([str(tmp_path / "a.txt")], str(tmp_path / "d"), seq_len=SEQ_LEN, val_fraction=0,
                   block_rows=50, log=lambda _m: None)
    assert len(load_manifest(tmp_path / "d").split("train").shards) == 1
    stream = TokenStream(tmp_path / "d", micro_batch_size=4, shuffle_blocks=2, seed=9)
    a, b = stream.row_order(0), stream.row_order(1)
    assert not np.array_equal(a[:100], b[:100])  # same shard order, so only the row shuffle differs


def test_reading_from_a_short_window_into_longer_ones(data_dir, natural):
    """Windows differ in size (an epoch's last one is short): starting in the short one and
    reading on into the next epoch's longer windows gives exactly the global order."""
    kw = dict(micro_batch_size=7, seed=4, shuffle_blocks=6)
    stream = TokenStream(data_dir, **kw)
    R = stream.rows_per_epoch
    last = int(stream.orders[0].layout(0).window_start[-2])
    assert np.diff(stream.orders[0].layout(1).window_start).max() > R - last
    got = rows_of(take(iter(TokenStream(data_dir, start_row=last, **kw)), (R - last + 120) // 7))
    order = np.concatenate([stream.row_order(0), stream.row_order(1)])
    np.testing.assert_array_equal(got, natural[order[last : last + len(got)]])


def test_different_seeds_give_different_orders(data_dir):
    a = TokenStream(data_dir, micro_batch_size=16, seed=1)
    b = TokenStream(data_dir, micro_batch_size=16, seed=2)
    assert not np.array_equal(a.row_order(0), b.row_order(0))
    assert not torch.equal(next(iter(a))[0], next(iter(b))[0])
    c = TokenStream(data_dir, micro_batch_size=16, seed=1)
    assert torch.equal(next(iter(a))[0], next(iter(c))[0])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), m=st.integers(1, 40), dp=st.sampled_from([2, 3]),
       start_row=st.integers(0, 2000), shuffle_blocks=st.sampled_from([1, 4, 8]))
def test_ranks_together_equal_the_single_rank_global_batch(data_dir, seed, m, dp, start_row, shuffle_blocks):
    kw = dict(seed=seed, shuffle_blocks=shuffle_blocks)
    n = 6
    split = global_rows(data_dir, dp=dp, m=m, n_batches=n, start_row=start_row, **kw)
    whole = rows_of(take(iter(TokenStream(data_dir, micro_batch_size=m * dp, start_row=start_row, **kw)), n))
    np.testing.assert_array_equal(split, whole)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), m=st.integers(1, 40), dp_before=st.sampled_from([1, 2, 3]),
       dp_after=st.sampled_from([1, 2, 3, 4]), done=st.integers(0, 30))
def test_resume_continues_exactly(data_dir, seed, m, dp_before, dp_after, done):
    G = m * dp_before
    total = (done + 12) * G
    uninterrupted = global_rows(data_dir, dp=dp_before, m=m, n_batches=done + 12, seed=seed)
    assert len(uninterrupted) == total
    # Resume after `done` global batches, possibly on another number of ranks.
    n_after = -(-(total - done * G) // (m * dp_after))
    resumed = global_rows(data_dir, dp=dp_after, m=m, n_batches=n_after, start_row=done * G, seed=seed)
    np.testing.assert_array_equal(resumed[: total - done * G], uninterrupted[done * G:])


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
@pytest.mark.parametrize("num_workers", [2, 3])
def test_workers_give_identical_batches(data_dir, num_workers):
    kw = dict(micro_batch_size=50, dp_rank=1, dp_size=2, seed=11, start_row=123)
    n = 3 * load_manifest(data_dir).split("train").rows // 100 + 5  # about three epochs
    direct = take(make_loader(TokenStream(data_dir, **kw), 0), n)
    loader = make_loader(TokenStream(data_dir, **kw), num_workers)
    workers = take(loader, n)
    del loader
    assert len(workers) == n
    for (xa, ya, _), (xb, yb, _) in zip(direct, workers):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_each_block_is_decompressed_once_per_window(data_dir, monkeypatch):
    calls = []
    real = shards_mod.ShardReader.decode_into

    def counting(reader, block_index, data, out):
        calls.append((str(reader.url), block_index))
        return real(reader, block_index, data, out)

    monkeypatch.setattr(shards_mod.ShardReader, "decode_into", counting)
    stream = TokenStream(data_dir, micro_batch_size=7, shuffle_blocks=3, seed=5)
    R = stream.rows_per_epoch
    take(iter(stream), R // 7)  # most of one epoch
    blocks = stream.split.blocks
    assert len(calls) <= blocks and len(set(calls)) == len(calls)


def test_resume_skips_shards_before_start_without_reading_them(data_dir, natural, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    train = load_manifest(copy).split("train")
    first = copy / train.shards[0].path
    first.write_bytes(first.read_bytes()[:100])  # would raise if it were read
    start = train.shards[0].rows + 3
    x, _, _ = next(iter(TokenStream(copy, micro_batch_size=4, shuffle=False, start_row=start)))
    np.testing.assert_array_equal(x.numpy(), natural[start:start + 4, :SEQ_LEN])
    with pytest.raises(ShardError, match=train.shards[0].path):
        next(iter(TokenStream(copy, micro_batch_size=4, shuffle=False)))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_shard_surfaces_shard_error_with_path(data_dir, tmp_path, num_workers):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    train = load_manifest(copy).split("train")
    victim = copy / train.shards[1].path
    data = bytearray(victim.read_bytes())
    data[512 + 40] ^= 0xFF  # inside the first member's zstd frame
    victim.write_bytes(bytes(data))
    loader = make_loader(TokenStream(copy, micro_batch_size=25, shuffle=False), num_workers)
    with pytest.raises(ShardError, match=train.shards[1].path):
        take(loader, 3 * train.rows // 25)
    del loader


def test_missing_shard_and_bad_arguments(data_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(data_dir, copy)
    train = load_manifest(copy).split("train")
    (copy / train.shards[2].path).unlink()
    with pytest.raises(ShardError, match=f"{train.shards[2].path}.*missing"):
        TokenStream(copy, micro_batch_size=4)
    with pytest.raises(ValueError, match="dp_rank"):
        TokenStream(data_dir, micro_batch_size=4, dp_rank=2, dp_size=2)
    with pytest.raises(KeyError, match="no split 'test'"):
        TokenStream(data_dir, "test", micro_batch_size=4)
    with pytest.raises(FileNotFoundError, match="distlm prepare"):
        TokenStream(tmp_path / "nowhere", micro_batch_size=4)


def test_val_split_streams(data_dir):
    stream = TokenStream(data_dir, "val", micro_batch_size=2, shuffle=False)
    x, y, _ = next(iter(stream))
    assert x.shape == (2, SEQ_LEN)


def test_remote_dataset_and_brace_pattern_read_the_same_rows(data_dir):
    from distlm.data.stream import Source
    from remote_server import serve_directory

    kw = dict(micro_batch_size=9, seed=5, shuffle_blocks=3)
    local = rows_of(take(iter(TokenStream(data_dir, **kw)), 60))
    n_shards = len(load_manifest(data_dir).split("train").shards)
    with serve_directory(data_dir.parent) as base:
        url = f"{base}/{data_dir.name}"
        over_http = rows_of(take(iter(TokenStream(url, **kw)), 60))
        # Shards found through a WebDataset brace pattern instead of the manifest's names.
        pattern = f"{url}/train-{{000000..{n_shards - 1:06d}}}.tar"
        braced = rows_of(take(iter(TokenStream([Source(str(data_dir), shards=pattern)], **kw)), 60))
    np.testing.assert_array_equal(over_http, local)
    np.testing.assert_array_equal(braced, local)
    with pytest.raises(ValueError, match="gives 2 URLs but"):
        TokenStream([Source(str(data_dir), shards=f"{data_dir}/train-{{000000..000001}}.tar")], **kw)


def test_pipe_urls_need_the_opt_in(data_dir):
    from distlm.data.stream import Source

    pattern = f"pipe:cat {data_dir}/train-{{000000..{len(load_manifest(data_dir).split('train').shards) - 1:06d}}}.tar"
    stream = TokenStream([Source(str(data_dir), shards=pattern)], micro_batch_size=4, shuffle=False)
    with pytest.raises(ValueError, match="allow_pipe"):
        next(iter(stream))
    opted = TokenStream([Source(str(data_dir), shards=pattern)], micro_batch_size=4, shuffle=False, allow_pipe=True)
    direct = TokenStream(data_dir, micro_batch_size=4, shuffle=False)
    assert torch.equal(next(iter(opted)).inputs, next(iter(direct)).inputs)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10**6), m=st.integers(1, 30), dp=st.integers(1, 4), workers=st.integers(1, 4),
       dp_after=st.integers(1, 4), workers_after=st.integers(1, 4), done=st.integers(0, 40),
       shuffle_blocks=st.sampled_from([1, 2, 8]))
def test_any_layout_and_resume_reads_each_epoch_as_a_permutation(data_dir, natural, seed, m, dp, workers,
                                                                  dp_after, workers_after, done, shuffle_blocks):
    """dp ranks x loader workers, interrupted after `done` global batches and resumed on another
    layout: the rows read are the single-process order, each epoch a permutation, no gap or repeat."""

    def read(dp, workers, start_row, n_global):
        # DataLoader takes micro-batch k of a rank from worker k % workers; ranks' slices concatenate.
        if n_global == 0:
            return np.empty((0, SEQ_LEN + 1), dtype=np.int64)
        per_rank = []
        for r in range(dp):
            stream = TokenStream(data_dir, micro_batch_size=m, dp_rank=r, dp_size=dp, seed=seed,
                                 shuffle_blocks=shuffle_blocks, start_row=start_row)
            its = [stream.worker_batches(w, workers) for w in range(workers)]
            per_rank.append([next(its[k % workers]) for k in range(n_global)])
        return np.concatenate([rows_of([per_rank[r][k] for r in range(dp)]) for k in range(n_global)])

    R = load_manifest(data_dir).split("train").rows
    before = read(dp, workers, 0, done)
    start = done * m * dp
    # Resume and read on to the end of epoch 1 (at least one more global batch).
    after = read(dp_after, workers_after, start, max(1, -(-(2 * R - start) // (m * dp_after))))
    got = np.concatenate([before, after])
    order = TokenStream(data_dir, micro_batch_size=m, seed=seed, shuffle_blocks=shuffle_blocks)
    expected = np.concatenate([order.row_order(0), order.row_order(1)])
    got = got[: len(expected)]
    np.testing.assert_array_equal(got, natural[expected][: len(got)])
    for e in range(2):  # each epoch visits every row of the split exactly once
        np.testing.assert_array_equal(np.sort(expected[e * R:(e + 1) * R]), np.arange(R))


def test_contiguous_batches_for_gpus_hold_the_same_rows(data_dir):
    kw = dict(micro_batch_size=6, seed=3, shuffle_blocks=2)
    views = take(iter(TokenStream(data_dir, **kw)), 40)
    contiguous = take(iter(TokenStream(data_dir, contiguous=True, **kw)), 40)
    for a, b in zip(views, contiguous):
        assert b.inputs.is_contiguous() and b.targets.is_contiguous()
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
