"""`distlm data verify`: real shards on disk, damaged in the ways files get damaged."""

import json
import re
import subprocess
import sys

import pytest

from distlm.data.prepare import prepare_corpus
from distlm.data.verify import verify_dataset
from helpers import ROOT


@pytest.fixture
def dataset(tmp_path):
    (tmp_path / "a.txt").write_text("All the world's a stage, and all the men and women merely players. " * 300)
    out = tmp_path / "ds"
    prepare_corpus([str(tmp_path / "a.txt")], out, tokenizer="byte", seq_len=16, val_fraction=0.1,
                   block_rows=32, log=lambda *_: None)
    return out


def _verify(path):
    return subprocess.run([sys.executable, "-m", "distlm", "data", "verify", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_intact_dataset_passes(dataset):
    assert verify_dataset(dataset, log=lambda *_: None) == []
    result = _verify(dataset)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all 2 shards" in result.stdout


@pytest.mark.parametrize("damage, words, kinds", [
    ("truncate", "size", {"truncated", "short", "checksum"}),  # which depends on where the cut lands
    ("flip", "sha256", {"truncated", "corrupt_frame", "truncated_frame", "row_count", "checksum"}),
    ("delete", "missing", {"missing"}),
])
def test_damaged_shard_is_named_and_fails(dataset, damage, words, kinds):
    shard = dataset / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "flip":
        data[len(data) // 3] ^= 0x40
        shard.write_bytes(bytes(data))
    else:
        shard.unlink()
    result = _verify(dataset)
    assert result.returncode == 3
    assert "BAD  train train-000000.tar" in result.stdout and words in result.stdout
    kind = re.search(r"BAD  train train-000000\.tar \[(\w+)\]", result.stdout).group(1)
    assert kind in kinds, result.stdout
    assert "ok   val" in result.stdout  # the healthy shard is still reported as healthy
    assert "1 of 2 shards" in result.stdout


def test_damage_hidden_by_a_rewritten_manifest_is_still_caught(dataset):
    """Flip a byte inside a block and update size and hash: the zstd frame checksum still fails."""
    import hashlib

    import tarfile

    shard = dataset / "train-000000.tar"
    with tarfile.open(shard) as tar:
        member = tar.getmembers()[0]
    data = bytearray(shard.read_bytes())
    data[member.offset_data + member.size // 2] ^= 0x01  # inside the first block's zstd frame
    shard.write_bytes(bytes(data))
    manifest = json.loads((dataset / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["sha256"] = hashlib.sha256(bytes(data)).hexdigest()
    (dataset / "manifest.json").write_text(json.dumps(manifest))
    problems = verify_dataset(dataset, log=lambda *_: None)
    assert [(p.path, p.kind) for p in problems] == [("train-000000.tar", "corrupt_frame")]
    assert "member 00000000" in problems[0].problem


def test_missing_manifest_is_a_clear_data_error(tmp_path):
    result = _verify(tmp_path)
    assert result.returncode == 3
    assert "distlm prepare" in result.stderr
