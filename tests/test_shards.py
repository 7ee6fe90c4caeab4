import hashlib
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds

from distlm.data.shards import (
    ShardError,
    ShardReader,
    ShardWriter,
    decode_block,
    dtype_for_vocab,
    encode_block,
    iter_shard_blocks,
    load_manifest,
    write_manifest,
)


def _blocks(dtype, row_len=7, sizes=(3, 5, 1), seed=0):
    rng = np.random.default_rng(seed)
    high = np.iinfo(dtype).max
    return [rng.integers(0, high, size=(n, row_len), endpoint=True).astype(dtype) for n in sizes]


def _write(path, blocks, dtype):
    with ShardWriter(path, dtype=dtype, row_len=blocks[0].shape[1]) as w:
        for b in blocks:
            w.add_block(b)
        return w.close()


@pytest.mark.parametrize("vocab, dtype", [(257, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_block_round_trip(tmp_path, vocab, dtype):
    assert dtype_for_vocab(vocab) == np.dtype(dtype)
    blocks = _blocks(dtype)
    path = tmp_path / "train-000000.tar"
    info = _write(path, blocks, dtype)
    data = path.read_bytes()
    assert info.path == path.name and info.rows == 9 and info.block_rows == [3, 5, 1]
    assert info.bytes == len(data) and info.sha256 == hashlib.sha256(data).hexdigest()
    assert not list(tmp_path.glob("*.tmp"))

    got = list(iter_shard_blocks(path, dtype=dtype, row_len=7))
    assert [i for i, _ in got] == [0, 1, 2]
    for (_, rows), ref in zip(got, blocks):
        assert rows.dtype == np.dtype(dtype) and np.array_equal(rows, ref)

    # Members are plain WebDataset samples: key %08d, one "tokens.zst" field.
    names = [m.name for m in tarfile.open(path).getmembers()]
    assert names == ["00000000.tokens.zst", "00000001.tokens.zst", "00000002.tokens.zst"]
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    assert [s["__key__"] for s in samples] == ["00000000", "00000001", "00000002"]

    with ShardReader(path, dtype=dtype, row_len=7, block_rows=info.block_rows) as reader:
        assert np.array_equal(reader.read(2), blocks[2])
        assert np.array_equal(reader.read(0), blocks[0])  # going back reopens the file


def test_shards_are_reproducible(tmp_path):
    blocks = _blocks(np.uint16)
    a = _write(tmp_path / "a.tar", blocks, np.uint16)
    b = _write(tmp_path / "b.tar", blocks, np.uint16)
    assert a.sha256 == b.sha256


def test_writer_aborts_on_error(tmp_path):
    path = tmp_path / "x.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(path, dtype=np.uint16, row_len=7) as w:
            w.add_block(_blocks(np.uint16)[0])
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _tar_with_frame(path, frame):
    with open(path, "wb") as f:
        with wds.TarWriter(f, encoder=False) as tw:
            tw.write({"__key__": "00000000", "tokens.zst": frame})


def test_truncated_frame_raises_shard_error_naming_shard(tmp_path):
    frame = encode_block(_blocks(np.uint16, sizes=(50,))[0])
    path = tmp_path / "train-000003.tar"
    _tar_with_frame(path, frame[: len(frame) // 2])
    with pytest.raises(ShardError, match=r"train-000003\.tar.*00000000\.tokens\.zst"):
        ShardReader(path, dtype=np.uint16, row_len=7).read(0)
    with pytest.raises(ShardError, match=r"train-000003\.tar"):
        list(iter_shard_blocks(path, dtype=np.uint16, row_len=7))


def test_bit_flipped_frame_raises_shard_error_naming_shard(tmp_path):
    frame = bytearray(encode_block(_blocks(np.uint16, sizes=(50,))[0]))
    frame[len(frame) // 2] ^= 0x10
    path = tmp_path / "val-000000.tar"
    _tar_with_frame(path, bytes(frame))
    with pytest.raises(ShardError, match=r"val-000000\.tar.*00000000\.tokens\.zst"):
        ShardReader(path, dtype=np.uint16, row_len=7, block_rows=[50]).read(0)


def test_every_single_bit_flip_is_caught_or_harmless():
    ref = _blocks(np.uint16, sizes=(20,))[0]
    frame = encode_block(ref)
    for i in range(len(frame)):
        for bit in (0, 3, 7):
            bad = bytearray(frame)
            bad[i] ^= 1 << bit
            try:
                got = decode_block(bytes(bad), dtype=np.uint16, row_len=7, where="x", expected_rows=20)
            except ShardError:
                continue
            assert np.array_equal(got, ref)  # a flip in an unused header bit changes nothing


def test_truncated_shard_file(tmp_path):
    blocks = _blocks(np.uint16, sizes=(200, 200, 200))
    path = tmp_path / "train-000000.tar"
    info = _write(path, blocks, np.uint16)
    data = path.read_bytes()
    for cut in (len(data) // 2, 512 * 3 + 7):
        path.write_bytes(data[:cut])
        with pytest.raises(ShardError, match=r"train-000000\.tar"):
            list(iter_shard_blocks(path, dtype=np.uint16, row_len=7, block_rows=info.block_rows))


def test_row_count_mismatch_with_manifest(tmp_path):
    path = tmp_path / "s.tar"
    _write(path, _blocks(np.uint16, sizes=(4,)), np.uint16)
    with pytest.raises(ShardError, match="manifest expects 5 rows"):
        ShardReader(path, dtype=np.uint16, row_len=7, block_rows=[5]).read(0)


def _manifest():
    return {
        "format": "distlm.shards", "version": 1, "seq_len": 6, "row_len": 7, "dtype": "uint16",
        "vocab_size": 257, "tokenizer": {"name": "byte"}, "tokenizer_file": "tokenizer.json",
        "splits": {"train": {"rows": 9, "tokens": 60, "dropped_tokens": 5, "shards": [
            {"path": "train-000000.tar", "rows": 9, "block_rows": [3, 5, 1], "bytes": 10, "sha256": "x"}]}},
        "source": {"inputs": ["a"], "documents": 1, "tokens": 60, "skipped_files": 0}, "created": "now",
    }


def test_manifest_round_trip(tmp_path):
    write_manifest(tmp_path, _manifest())
    m = load_manifest(tmp_path)
    assert m.seq_len == 6 and m.row_len == 7 and m.np_dtype == np.uint16
    train = m.split("train")
    assert train.rows == 9 and train.blocks == 3 and train.shards[0].block_rows == [3, 5, 1]
    assert train["rows"] == 9 and train["shards"][0]["block_rows"] == [3, 5, 1]  # reads like the JSON too
    assert m.shard_path(train.shards[0]) == tmp_path / "train-000000.tar"
    assert m.to_dict() == _manifest()
    with pytest.raises(KeyError, match="no split 'val'.*val-fraction"):
        m.split("val")


def test_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"distlm prepare .*--out"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found.*distlm prepare"):
        load_manifest(tmp_path)
    d = _manifest()
    d["version"] = 7
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match="version 7 is not supported"):
        load_manifest(tmp_path)
    d = _manifest()
    del d["splits"]["train"]["shards"][0]["block_rows"]
    (tmp_path / "manifest.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"missing key 'block_rows'"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        load_manifest(tmp_path)
