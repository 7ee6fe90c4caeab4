import hashlib
import io
import json
import shutil
import subprocess
import tarfile

import numpy as np
import pytest
import webdataset as wds

from distlm.data.shards import (
    ShardError,
    ShardReader,
    ShardWriter,
    TarMemberReader,
    decode_block,
    decode_block_into,
    dtype_for_vocab,
    encode_block,
    iter_shard_blocks,
    load_manifest,
    write_manifest,
)
from distlm.data.remote import expand_urls, open_url
from distlm.data.verify import verify_dataset
from remote_server import serve_directory


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


# ---- the tar member reader -----------------------------------------------------------------


def _members_via_tarfile(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]


def _members_via_reader(path):
    with open(path, "rb") as f:
        reader = TarMemberReader(f, str(path))
        return list(iter(reader.next, None))


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_reader_reads_what_tarfile_writes(tmp_path, fmt):
    """Long names (pax 'x' records, GNU 'L' members, the ustar prefix), non-ASCII names, a pax
    global header and sizes that are and are not multiples of 512."""
    path = tmp_path / "t.tar"
    names = ["short.txt", "d/" * 60 + "long-name.tokens.zst", "empty", "x" * 99, "exact512"]
    if fmt == tarfile.PAX_FORMAT:
        names.append("naïve-ünïcode.bin")
    pax_headers = {"comment": "global header"} if fmt == tarfile.PAX_FORMAT else {}
    with tarfile.open(path, "w", format=fmt, pax_headers=pax_headers) as tar:
        for i, name in enumerate(names):
            data = b"" if name == "empty" else bytes(512) if name == "exact512" else bytes([i]) * (700 * i + 3)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    expected = _members_via_tarfile(path)
    assert [n for n, _ in expected] == names
    assert _members_via_reader(path) == expected


def test_tar_reader_reads_shard_writer_output_and_tar_tools_read_it(tmp_path):
    blocks = _blocks(np.uint16, sizes=(3, 1, 2))
    path = tmp_path / "train-000000.tar"
    _write(path, blocks, np.uint16)
    assert _members_via_reader(path) == _members_via_tarfile(path)
    if shutil.which("tar"):
        listed = subprocess.run(["tar", "tf", str(path)], capture_output=True, text=True, check=True).stdout
        assert listed.split() == ["00000000.tokens.zst", "00000001.tokens.zst", "00000002.tokens.zst"]


def test_tar_reader_rejects_garbage_and_non_files(tmp_path):
    garbage = tmp_path / "garbage.tar"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(ShardError, match=r"garbage\.tar: the tar header at byte 0 .*fails its checksum") as info:
        _members_via_reader(garbage)
    assert info.value.kind == "truncated" and info.value.url == str(garbage)

    links = tmp_path / "links.tar"
    with tarfile.open(links, "w") as tar:
        info = tarfile.TarInfo("00000000.tokens.zst")
        info.type, info.linkname = tarfile.SYMTYPE, "elsewhere"
        tar.addfile(info)
    with pytest.raises(ShardError, match=r"'00000000\.tokens\.zst' .*is a symbolic link; a shard holds only"):
        _members_via_reader(links)
    with pytest.raises(ShardError) as err:
        ShardReader(links, dtype=np.uint16, row_len=7).read(0)
    assert (err.value.kind, err.value.block) == ("missing_field", 0)


def test_truncated_checksum_of_the_last_frame_is_caught():
    """zstd decodes a frame whose 4-byte checksum was cut off without complaint; the frame
    length check catches it, and trailing bytes after a frame too."""
    ref = _blocks(np.uint16, sizes=(20,))[0]
    frame = encode_block(ref)
    for cut in range(1, 5):
        with pytest.raises(ShardError, match="truncated") as info:
            decode_block(frame[:-cut], dtype=np.uint16, row_len=7, where="x", expected_rows=20)
        assert info.value.kind == "truncated_frame"
    with pytest.raises(ShardError, match="unexpected bytes after") as info:
        decode_block(frame + b"\0", dtype=np.uint16, row_len=7, where="x", expected_rows=20)
    assert info.value.kind == "corrupt_frame"
    out = np.empty_like(ref)
    decode_block_into(frame, out, where="x")
    assert np.array_equal(out, ref)


# ---- remote datasets -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    """A dataset of several small shards in train and val; tests only read it."""
    from distlm.data.prepare import prepare_corpus

    tmp_path = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(1)
    text = " ".join("".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 9))) for _ in range(3000))
    (tmp_path / "a.txt").write_text(text)
    out = tmp_path / "ds"
    prepare_corpus([str(tmp_path / "a.txt")], out, tokenizer="byte", seq_len=32, val_fraction=0.1, shard_mb=0.008,
                   block_rows=4, log=lambda *_: None)
    return out


def _all_blocks(m, **kw):
    return {(name, s.path): [rows for _, rows in iter_shard_blocks(m.shard_url(s), dtype=m.np_dtype,
                                                                   row_len=m.row_len, block_rows=s.block_rows, **kw)]
            for name, split in sorted(m.splits.items()) for s in split.shards}


def _same_blocks(a, b):
    return a.keys() == b.keys() and all(len(a[k]) == len(b[k]) and all(np.array_equal(x, y) for x, y in zip(a[k], b[k]))
                                        for k in a)


def test_remote_dataset_over_http_equals_local(small_dataset, monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)  # straight to 127.0.0.1
    local = load_manifest(small_dataset)
    assert local.location == str(small_dataset) and local.path == small_dataset and not local.is_remote
    assert local.shard_url(local.split("train").shards[0]) == str(small_dataset / "train-000000.tar")
    with serve_directory(small_dataset.parent) as base:
        remote = load_manifest(f"{base}/ds")
        assert remote.to_dict() == local.to_dict()
        assert remote.location == f"{base}/ds" and remote.path is None
        shards = remote.split("train").shards
        assert len(shards) >= 3
        assert remote.shard_url(shards[2]) == f"{base}/ds/train-000002.tar"
        with pytest.raises(ValueError, match="shard_url"):
            remote.shard_path(shards[0])
        assert _same_blocks(_all_blocks(remote), _all_blocks(local))
        # A brace pattern names the same shards.
        pattern = f"{base}/ds/train-{{000000..{len(shards) - 1:06d}}}.tar"
        assert expand_urls(pattern) == [remote.shard_url(s) for s in shards]
        with ShardReader(expand_urls(pattern)[1], dtype=remote.np_dtype, row_len=remote.row_len) as reader:
            assert [i for i, _ in reader.blocks()] == list(range(len(shards[1].block_rows)))
        assert verify_dataset(f"{base}/ds", log=lambda *_: None) == []


def test_file_urls_and_pipe_templates(small_dataset):
    local = load_manifest(small_dataset)
    via_file = load_manifest(f"file://{small_dataset}")
    assert via_file.location == str(small_dataset) and via_file.to_dict() == local.to_dict()
    with pytest.raises(ValueError, match="allow_pipe: true"):
        load_manifest(f"pipe:cat {small_dataset}/{{}}")
    piped = load_manifest(f"pipe:cat {small_dataset}/{{}}", allow_pipe=True)
    assert piped.is_remote and piped.to_dict() == local.to_dict()
    assert piped.shard_url(piped.split("val").shards[0]) == f"pipe:cat {small_dataset}/val-000000.tar"
    assert _same_blocks(_all_blocks(piped, allow_pipe=True), _all_blocks(local))


def test_pipe_needs_opt_in(small_dataset):
    url = f"pipe:cat {small_dataset}/train-000000.tar"
    with pytest.raises(ValueError, match=r"runs? a shell command.*`data.allow_pipe: true`"):
        ShardReader(url, dtype=np.uint16, row_len=33).read(0)
    with pytest.raises(ValueError, match="allow_pipe"):
        open_url(url)
    with ShardReader(url, dtype=np.uint16, row_len=33, allow_pipe=True) as reader:
        piped = reader.read(1)
    with ShardReader(small_dataset / "train-000000.tar", dtype=np.uint16, row_len=33) as reader:
        assert np.array_equal(piped, reader.read(1))


def test_expand_urls():
    assert expand_urls("http://h/ds/train-{000000..000002}.tar") == [
        "http://h/ds/train-000000.tar", "http://h/ds/train-000001.tar", "http://h/ds/train-000002.tar"]
    assert expand_urls("s-{a,b}-{0..1}.tar") == ["s-a-0.tar", "s-a-1.tar", "s-b-0.tar", "s-b-1.tar"]
    assert expand_urls("a.tar::b-{1..2}.tar") == ["a.tar", "b-1.tar", "b-2.tar"]
    assert expand_urls("/plain/path.tar") == ["/plain/path.tar"]
    with pytest.raises(ValueError, match="unbalanced braces"):
        expand_urls("train-{000..009.tar")
    with pytest.raises(ValueError, match="empty"):
        expand_urls("")


def test_unsupported_schemes_point_to_pipe():
    with pytest.raises(ValueError, match=r"unsupported URL scheme 's3'.*pipe:aws s3 cp"):
        ShardReader("s3://bucket/ds/train-000000.tar", dtype=np.uint16, row_len=7)
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        load_manifest("gs://bucket/ds")


def test_manifest_refuses_shard_paths_outside_the_dataset(tmp_path):
    for bad in ("../escape.tar", "/etc/passwd", "a/../../b.tar", "x.tar; rm -rf ~", "http://h/x.tar"):
        d = _manifest()
        d["splits"]["train"]["shards"][0]["path"] = bad
        (tmp_path / "manifest.json").write_text(json.dumps(d))
        with pytest.raises(ValueError, match="not a plain relative file name"):
            load_manifest(tmp_path)


def test_manifest_lists_tokens_per_shard_and_refuses_a_wrong_count(tmp_path):
    from distlm.data.prepare import prepare_corpus

    (tmp_path / "t.txt").write_text("tokens per shard " * 300)
    out = tmp_path / "d"
    prepare_corpus([str(tmp_path / "t.txt")], str(out), seq_len=16, val_fraction=0, block_rows=4, shard_mb=0.002,
                   log=lambda _m: None)
    manifest = load_manifest(out)
    shards = manifest.split("train").shards
    assert len(shards) > 1 and all(s.tokens == s.rows * manifest.row_len for s in shards)
    raw = json.loads((out / "manifest.json").read_text())
    raw["splits"]["train"]["shards"][1]["tokens"] += 1
    (out / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"shard #1: tokens=\d+ is not rows x row_len"):
        load_manifest(out)
