"""`bench_dataset`: the loader against bare zstd on a small real dataset (no speed is asserted)."""

import re
import shutil

import numpy as np
import pytest

from distlm.data.bench import bench_dataset
from distlm.data.prepare import prepare_corpus
from distlm.data.shards import ShardError, load_manifest

LAST_LINE = re.compile(r"loader_tokens_per_s=(\d+) zstd_tokens_per_s=(\d+) ratio=(\d+\.\d{2,3})")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Two train shards of 20-row blocks, several shuffling windows."""
    root = tmp_path_factory.mktemp("bench")
    rng = np.random.default_rng(3)
    for i in range(4):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "\n"], size=3000)
        (root / f"doc{i}.txt").write_text(" ".join(words))
    out = root / "ds"
    prepare_corpus([str(root)], out, tokenizer="byte", seq_len=32, val_fraction=0.05, block_rows=20,
                   shard_mb=0.05, log=lambda *_: None)
    assert len(load_manifest(out).split("train").shards) >= 2
    return out


@pytest.fixture(scope="module")
def measured(dataset):
    lines = []
    result = bench_dataset(dataset, micro_batch_size=4, seconds=0.3, log=lines.append)
    return result, lines


def test_rates_are_positive_and_ratio_is_their_quotient(dataset, measured):
    result, _ = measured
    m = load_manifest(dataset)
    assert result["loader_tokens_per_s"] > 0 and result["zstd_tokens_per_s"] > 0
    assert result["ratio"] == result["loader_tokens_per_s"] / result["zstd_tokens_per_s"]
    assert result["rows"] == m.split("train").rows and result["seq_len"] == 32
    assert result["blocks"] == m.split("train").blocks


def test_header_first_and_summary_line_last(dataset, measured):
    result, lines = measured
    assert len(lines) >= 2
    assert str(dataset) in lines[0] and "seq_len 32" in lines[0]
    match = LAST_LINE.fullmatch(lines[-1])
    assert match, lines[-1]
    assert int(match[1]) == round(result["loader_tokens_per_s"])
    assert int(match[2]) == round(result["zstd_tokens_per_s"])
    assert float(match[3]) == pytest.approx(result["ratio"], abs=1e-3)


def test_val_split_and_other_micro_batch(dataset):
    lines = []
    result = bench_dataset(dataset, "val", micro_batch_size=3, seconds=0.05, log=lines.append)
    assert result["split"] == "val" and result["micro_batch_size"] == 3
    assert result["ratio"] > 0 and LAST_LINE.fullmatch(lines[-1])


def test_missing_shard_names_it(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    victim = load_manifest(copy).split("train").shards[1].path
    (copy / victim).unlink()
    with pytest.raises(ShardError, match=f"{victim}.*missing"):
        bench_dataset(copy, seconds=0.05, log=lambda *_: None)


def test_seconds_must_be_positive(dataset):
    with pytest.raises(ValueError, match="seconds"):
        bench_dataset(dataset, seconds=0, log=lambda *_: None)
