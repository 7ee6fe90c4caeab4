"""The training stream meets damaged data (reliability matrix rows 18-19).

With ``on_error=skip`` a damaged block's rows keep their positions but are masked (targets
-100), every other row is exactly the clean dataset's, each kind is counted and the shard is
logged once; past ``max_error_rate`` the run stops. With ``fail`` the first fault stops it,
naming the shard and the kind.
"""

import itertools
import shutil

import numpy as np
import pytest
import torch

import faults
from distlm.data.prepare import prepare_corpus
from distlm.data.shards import ShardError, iter_shard_blocks, load_manifest
from distlm.data.stream import IGNORE_INDEX, TokenStream, make_loader

SEQ_LEN = 8
VICTIM = 1  # the damaged shard
MEMBER = 2  # the damaged member inside it


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("errors")
    rng = np.random.default_rng(3)
    for i in range(25):
        n = int(rng.integers(80, 300))
        (root / f"{i:02d}.txt").write_text("".join(chr(97 + int(c)) for c in rng.integers(0, 26, n)))
    out = root / "data"
    prepare_corpus([str(root)], str(out), seq_len=SEQ_LEN, val_fraction=0, block_rows=5, shard_mb=0.005,
                   log=lambda _m: None)
    m = load_manifest(out)
    assert len(m.split("train").shards) >= 3 and len(m.split("train").shards[VICTIM].block_rows) > MEMBER + 1
    natural = np.concatenate([rows for s in m.split("train").shards
                              for _, rows in iter_shard_blocks(m.shard_path(s), dtype=m.np_dtype, row_len=m.row_len)])
    return out, natural.astype(np.int64)


def _damaged(clean, tmp_path, fault, **kw):
    src, _ = clean
    copy = tmp_path / "copy"
    shutil.copytree(src, copy)
    shard = copy / load_manifest(copy).split("train").shards[VICTIM].path
    fault(shard, **kw)
    return copy


def _victim_rows(clean):
    """Natural row range of the victim shard, and the first row of each of its blocks."""
    m = load_manifest(clean[0])
    shards = m.split("train").shards
    first = sum(s.rows for s in shards[:VICTIM])
    starts = first + np.concatenate([[0], np.cumsum(shards[VICTIM].block_rows)])
    return starts


def _read_epoch(path, m=7, **kw):
    stream = TokenStream(path, micro_batch_size=m, shuffle=False, on_error="skip", max_error_rate=0.5,
                         log=kw.pop("log", lambda _m: None), **kw)
    R = stream.rows_per_epoch
    rows, masked, errors = [], [], {}
    for batch in itertools.islice(iter(stream), -(-R // m)):
        x, y = batch.inputs.numpy(), batch.targets.numpy()
        rows.append(np.concatenate([x, y[:, -1:]], axis=1))
        masked.append((y == IGNORE_INDEX).all(axis=1))
        errors = _merge(errors, batch.errors)
    return np.concatenate(rows)[:R], np.concatenate(masked)[:R], errors


def _merge(totals, errors):
    """Events (kind, url, block, epoch) by kind, once each, and the rows skipped."""
    totals.setdefault("rows_skipped", 0)
    totals.setdefault("seen", set())
    for event in (errors or {}).get("events", []):
        if tuple(event) not in totals["seen"]:
            totals["seen"].add(tuple(event))
            totals[event[0]] = totals.get(event[0], 0) + 1
    totals["rows_skipped"] += (errors or {}).get("rows_skipped", 0)
    return totals


FAULTS = [
    # (fault, its arguments, the kind it must be counted as, only the damaged block is lost)
    (faults.cut_mid_member, {"member": MEMBER}, "truncated", False),
    (faults.cut_at_member_boundary, {"keep_members": MEMBER}, "short", False),
    (faults.make_empty, {}, "empty", False),
    (faults.remove, {}, "missing", False),
    (faults.zero_samples, {}, "zero_samples", False),
    (faults.missing_field, {"member": MEMBER}, "missing_field", False),
    (faults.duplicate_key, {"member": MEMBER}, "duplicate_key", False),
    (faults.truncate_frame, {"member": MEMBER}, "truncated_frame", True),
    (faults.flip_bit, {"member": MEMBER}, "corrupt_frame", True),
]


@pytest.mark.parametrize("fault, kw, kind, local", FAULTS, ids=[f[2] for f in FAULTS])
def test_skip_masks_exactly_the_damaged_rows_and_counts_the_kind(clean, tmp_path, fault, kw, kind, local):
    path = _damaged(clean, tmp_path, fault, **kw)
    natural = clean[1]
    logged = []
    rows, masked, errors = _read_epoch(path, log=logged.append)
    starts = _victim_rows(clean)
    first_bad = starts[kw.get("member", kw.get("keep_members", 0))]
    # Nothing before the damage is lost; with a block-local fault nothing after it either.
    lost = np.flatnonzero(masked)
    assert len(lost) > 0 and lost.min() >= first_bad and lost.max() < starts[-1]
    if local:
        np.testing.assert_array_equal(lost, np.arange(starts[MEMBER], starts[MEMBER + 1]))
    if kind == "duplicate_key":  # the repeated member itself is read once, the damage starts after it
        assert masked[starts[MEMBER + 1]]
    elif "member" in kw or "keep_members" in kw:
        assert masked[first_bad]
    else:
        np.testing.assert_array_equal(lost, np.arange(starts[0], starts[-1]))
    # Every row that is not masked is the clean dataset's row at that position.
    np.testing.assert_array_equal(rows[~masked], natural[~masked])
    assert errors.get(kind, 0) == 1 and set(errors) == {kind, "rows_skipped", "seen"}
    assert errors["rows_skipped"] == masked.sum()
    shard_name = load_manifest(path).split("train").shards[VICTIM].path
    assert len(logged) == 1 and shard_name in logged[0] and kind in logged[0]


@pytest.mark.parametrize("fault, kw, kind", [(f[0], f[1], f[2]) for f in FAULTS[::2]], ids=[f[2] for f in FAULTS[::2]])
def test_fail_stops_at_the_first_fault_naming_shard_and_kind(clean, tmp_path, fault, kw, kind):
    path = _damaged(clean, tmp_path, fault, **kw)
    shard_name = load_manifest(path).split("train").shards[VICTIM].path
    with pytest.raises(ShardError, match=f"{shard_name}.*data.on_error=fail") as info:
        stream = TokenStream(path, micro_batch_size=7, shuffle=False)
        list(itertools.islice(iter(stream), stream.rows_per_epoch // 7 + 1))
    assert info.value.kind == kind


def test_past_the_error_rate_the_run_stops_with_the_counts(clean, tmp_path):
    path = _damaged(clean, tmp_path, faults.remove)
    stream = TokenStream(path, micro_batch_size=7, shuffle=False, on_error="skip", max_error_rate=0.01,
                         log=lambda _m: None)
    with pytest.raises(ShardError, match=r"rows read are damaged .*more than data.max_error_rate=1.00% \(missing x1\)"):
        list(itertools.islice(iter(stream), stream.rows_per_epoch // 7 + 1))


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_counts_reach_the_training_process_through_loader_workers(clean, tmp_path):
    path = _damaged(clean, tmp_path, faults.flip_bit, member=MEMBER)
    stream = TokenStream(path, micro_batch_size=5, shuffle=True, seed=2, on_error="skip", max_error_rate=0.5,
                         log=lambda _m: None)
    n = stream.rows_per_epoch // 5
    direct = list(itertools.islice(iter(stream), n))
    loader = make_loader(stream, 2)
    workers = list(itertools.islice(loader, n))
    del loader

    def totals(batches):
        merged = {}
        for b in batches:
            merged = _merge(merged, b.errors)
        return merged

    # Each of the two workers meets the bad block (each reads every window); counted once.
    assert totals(direct)["corrupt_frame"] == totals(workers)["corrupt_frame"] == 1
    assert totals(workers)["rows_skipped"] == totals(direct)["rows_skipped"] > 0
    for a, b in zip(direct, workers):
        assert torch.equal(a.targets, b.targets) and torch.equal(a.inputs, b.inputs)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_a_fault_in_a_loader_worker_reaches_the_training_process_whole(clean, tmp_path):
    path = _damaged(clean, tmp_path, faults.cut_mid_member, member=MEMBER)
    stream = TokenStream(path, micro_batch_size=7, shuffle=False)
    loader = make_loader(stream, 1)
    with pytest.raises(ShardError, match="data.on_error=fail") as info:
        list(itertools.islice(loader, stream.rows_per_epoch // 7 + 1))
    del loader
    assert info.value.kind == "truncated" and info.value.url.endswith(".tar") and info.value.block == MEMBER


def test_a_fully_masked_micro_batch_has_zero_loss_not_nan():
    from distlm.config import ModelConfig
    from distlm.model import Transformer

    model = Transformer(ModelConfig(vocab_size=30, max_seq_len=8, n_layers=1, d_model=16, n_heads=2))
    x = torch.zeros(2, 8, dtype=torch.int64)
    y = torch.full((2, 8), IGNORE_INDEX)
    loss = model(x, y)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
