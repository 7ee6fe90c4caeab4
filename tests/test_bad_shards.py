"""Bad input (reliability matrix rows 18 and 19): every way a shard gets damaged is detected,
classified by kind with its URL, and never read as fewer rows; ``distlm data verify`` names it.
"""

import os
import pickle
import random
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import faults
from distlm.data.prepare import prepare_corpus
from distlm.data.remote import open_url
from distlm.data.shards import ERROR_KINDS, ShardError, ShardReader, iter_shard_blocks, load_manifest
from distlm.data.verify import check_shard, verify_dataset
from helpers import ROOT
from remote_server import serve_directory

VICTIM = 1  # the shard damaged in single-fault tests; shard 0 stays intact


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """A dataset of ~28 shards of 9 blocks (4 rows of 33 byte ids each), and its decoded blocks."""
    root = tmp_path_factory.mktemp("bad-shards")
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(500)]
    (root / "a.txt").write_text(" ".join(rng.choice(words) for _ in range(5000)))
    out = root / "ds"
    prepare_corpus([str(root / "a.txt")], out, tokenizer="byte", seq_len=32, val_fraction=0, shard_mb=0.008,
                   block_rows=4, log=lambda *_: None)
    m = load_manifest(out)
    shards = m.split("train").shards
    assert len(shards) >= 16 and all(len(s.block_rows) >= 6 for s in shards[:-1])
    blocks = {s.path: [rows for _, rows in iter_shard_blocks(m.shard_path(s), dtype=m.np_dtype, row_len=m.row_len,
                                                              block_rows=s.block_rows)] for s in shards}
    return out, blocks


@pytest.fixture
def dataset(clean, tmp_path):
    copy = tmp_path / "ds"
    shutil.copytree(clean[0], copy)
    return copy


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Requests to the test server go straight to 127.0.0.1, never through a configured proxy."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


# name -> (damage(path), kind, first bad block)
FAULTS = {
    "cut_mid_member": (lambda p: faults.cut_mid_member(p, member=2), "truncated", 2),
    "cut_in_header": (lambda p: faults.cut_in_header(p, member=2), "truncated", 2),
    "cut_at_member_boundary": (lambda p: faults.cut_at_member_boundary(p, keep_members=2), "short", 2),
    "empty": (faults.make_empty, "empty", 0),
    "missing": (faults.remove, "missing", 0),
    "zero_samples": (faults.zero_samples, "zero_samples", 0),
    "missing_field": (lambda p: faults.missing_field(p, member=2), "missing_field", 2),
    "duplicate_key": (lambda p: faults.duplicate_key(p, member=1), "duplicate_key", 2),
    "truncate_frame": (lambda p: faults.truncate_frame(p, member=2), "truncated_frame", 2),
    "flip_bit": (lambda p: faults.flip_bit(p, member=2), "corrupt_frame", 2),
}


def _reader(m, shard, **kw):
    return ShardReader(m.shard_url(shard), dtype=m.np_dtype, row_len=m.row_len, block_rows=shard.block_rows, **kw)


@pytest.mark.parametrize("name", list(FAULTS))
def test_reader_classifies_every_fault(dataset, clean, name):
    damage, kind, bad = FAULTS[name]
    m = load_manifest(dataset)
    shard = m.split("train").shards[VICTIM]
    damage(dataset / shard.path)
    good = clean[1][shard.path]
    with _reader(m, shard) as reader:
        for i in range(bad):  # the blocks before the fault still read, unchanged
            assert np.array_equal(reader.read(i), good[i])
        with pytest.raises(ShardError) as info:
            reader.read(bad)
        error = info.value
        assert (error.kind, error.url, error.block) == (kind, m.shard_url(shard), bad), str(error)
        assert shard.path in str(error) and "distlm prepare" in str(error)
        if error.block_local:  # only this block is bad: the rest of the shard still reads
            for i in range(bad + 1, len(shard.block_rows)):
                assert np.array_equal(reader.read(i), good[i])
        else:  # nothing at or after the fault is ever returned, and the reader says so again
            with pytest.raises(ShardError) as again:
                reader.read(len(shard.block_rows) - 1)
            assert again.value.kind == kind
            if bad > 0:
                assert np.array_equal(reader.read(0), good[0])
    # Iterating the whole shard stops at the same fault, never with fewer blocks and no error.
    with pytest.raises(ShardError) as info:
        list(_reader(m, shard).blocks())
    assert info.value.kind == kind


def test_row_count_disagreeing_with_the_manifest(dataset, clean):
    m = load_manifest(dataset)
    shard = m.split("train").shards[VICTIM]
    shard.block_rows[1] += 1  # as if the manifest listed a block of another size
    with _reader(m, shard) as reader:
        with pytest.raises(ShardError, match="manifest expects 5 rows") as info:
            reader.read(1)
        assert (info.value.kind, info.value.block, info.value.block_local) == ("row_count", 1, True)
        out = np.empty((4, m.row_len), m.np_dtype)
        with pytest.raises(ValueError, match="output array"):  # a wrong buffer is the caller's bug
            reader.decode_into(1, reader.raw(2), out)
        assert np.array_equal(reader.read(3), clean[1][shard.path][3])


def test_extra_and_repeated_last_members_are_caught_at_the_end(dataset):
    m = load_manifest(dataset)
    train = m.split("train").shards
    last = len(train[VICTIM].block_rows) - 1
    faults.duplicate_key(dataset / train[VICTIM].path, member=last)
    with _reader(m, train[VICTIM]) as reader:
        for i in range(last + 1):  # every listed block reads...
            reader.read(i)
        with pytest.raises(ShardError) as info:  # ...but the archive goes on
            reader.expect_end()
    assert info.value.kind == "duplicate_key"
    # A manifest that lists fewer blocks than the archive holds.
    shard = train[2]
    shard.block_rows = shard.block_rows[:-1]
    with pytest.raises(ShardError) as info:
        list(_reader(m, shard).blocks())
    assert info.value.kind == "row_count"


def test_every_single_bit_flip_in_a_shard_is_caught_or_harmless(dataset, clean):
    """Bit rot anywhere in a shard (headers, frames, padding): verify always sees it (sha256),
    and the reader either raises or returns exactly the right rows (a flip in padding or an
    unused header bit changes nothing it reads)."""
    m = load_manifest(dataset)
    shard = m.split("train").shards[VICTIM]
    path = dataset / shard.path
    data = path.read_bytes()
    good = clean[1][shard.path]
    seen = set()
    for offset in range(0, len(data), 7):
        bad = bytearray(data)
        bad[offset] ^= 1 << (offset % 8)
        path.write_bytes(bytes(bad))
        try:
            got = list(_reader(m, shard).blocks())
        except ShardError as e:
            seen.add(e.kind)
        else:
            assert all(np.array_equal(rows, good[i]) for i, rows in got) and len(got) == len(good)
        assert check_shard(m, shard) is not None
    assert {"truncated", "corrupt_frame"} <= seen


def _reads_or_raises(m, shard, good) -> bool:
    """True when reading every block with the manifest's block_rows raised ShardError; asserts
    that when it did not, every block came back whole and unchanged."""
    try:
        with _reader(m, shard) as reader:
            got = [reader.read(i) for i in range(len(shard.block_rows))]
    except ShardError as e:
        assert e.kind in ("empty", "truncated", "short", "truncated_frame"), e
        return True
    assert len(got) == len(good) and all(np.array_equal(a, b) for a, b in zip(got, good))
    return False


@pytest.fixture(scope="module")
def cut_target(clean, tmp_path_factory):
    """A private copy of the dataset whose victim shard the property test cuts again and again."""
    copy = tmp_path_factory.mktemp("cuts") / "ds"
    shutil.copytree(clean[0], copy)
    m = load_manifest(copy)
    shard = m.split("train").shards[VICTIM]
    last = faults.members(copy / shard.path)[-1]
    data_end = last.offset_data + last.size  # past here only padding and end-of-archive blocks follow
    return m, shard, (copy / shard.path).read_bytes(), clean[1][shard.path], data_end


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(min_value=0, max_value=1, exclude_max=True))
@example(fraction=0.0)
@example(fraction=511 / 10240)
@example(fraction=1024 / 10240)  # a member boundary
@example(fraction=9216 / 10240)  # after the last member, before the end blocks
@example(fraction=10239 / 10240)
def test_a_cut_at_any_offset_is_never_a_silent_short_read(cut_target, fraction):
    m, shard, data, good, data_end = cut_target
    cut = int(fraction * len(data))
    (m.path / shard.path).write_bytes(data[:cut])
    raised = _reads_or_raises(m, shard, good)
    problem = check_shard(m, shard)
    assert problem is not None and problem.url.endswith(shard.path)  # verify always names it
    if not raised:  # only padding or end-of-archive blocks were lost: every row was read, unchanged
        assert cut >= data_end


def test_every_cut_offset_of_a_shard(cut_target):
    """A sweep version of the property above, over one shard: Python's tarfile misses
    about 4 cuts in 10; here the reader misses only cuts after the last byte of data."""
    m, shard, data, good, data_end = cut_target
    path = m.path / shard.path
    # Every byte of the first member and the next header; every 7th byte after that (the rest
    # repeats the same header / data / padding pattern) and both sides of every 512-byte record.
    records = {b + d for b in range(512, len(data), 512) for d in (-1, 0, 1)}
    for cut in sorted(set(range(1536)) | set(range(1536, len(data), 7)) | records - {len(data)}):
        path.write_bytes(data[:cut])
        if not _reads_or_raises(m, shard, good):
            assert cut >= data_end, f"a cut at byte {cut} of {len(data)} read as intact"
    path.write_bytes(data)


@pytest.mark.parametrize("name", list(FAULTS))
def test_verify_names_each_fault(dataset, name):
    damage, kind, _ = FAULTS[name]
    m = load_manifest(dataset)
    shard = m.split("train").shards[VICTIM]
    damage(dataset / shard.path)
    lines = []
    problems = verify_dataset(dataset, log=lines.append)
    assert [(p.path, p.kind) for p in problems] == [(shard.path, kind)]
    assert any(line.startswith(f"BAD  train {shard.path} [{kind}]") for line in lines)


def test_verify_cli_exits_non_zero_naming_every_bad_shard(dataset):
    """All faults at once, one shard each, plus manifest-level ones: one line per bad shard
    with its kind, the healthy shard reported ok, exit status 3."""
    import json

    m = load_manifest(dataset)
    shards = m.split("train").shards
    expected = {}
    for i, (name, (damage, kind, _)) in enumerate(FAULTS.items(), start=1):
        damage(dataset / shards[i].path)
        expected[shards[i].path] = kind
    n = len(FAULTS) + 1
    faults.duplicate_key(dataset / shards[n].path, member=len(shards[n].block_rows) - 1)
    expected[shards[n].path] = "duplicate_key"
    raw = json.loads((dataset / "manifest.json").read_text())
    listed = raw["splits"]["train"]["shards"]
    listed[n + 1]["block_rows"][0] -= 1
    listed[n + 1]["block_rows"][1] += 1
    expected[shards[n + 1].path] = "row_count"
    listed[n + 2]["sha256"] = "0" * 64
    expected[shards[n + 2].path] = "checksum"
    (dataset / "manifest.json").write_text(json.dumps(raw))

    result = subprocess.run([sys.executable, "-m", "distlm", "data", "verify", str(dataset)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, result.stdout + result.stderr
    out = result.stdout
    for path, kind in expected.items():
        assert f"BAD  train {path} [{kind}]" in out, out
    assert f"ok   train {shards[0].path}" in out
    assert f"{len(expected)} of {len(shards)} shards" in out
    assert sum(line.startswith("BAD") for line in out.splitlines()) == len(expected)


def test_verify_cli_passes_a_clean_dataset(dataset):
    result = subprocess.run([sys.executable, "-m", "distlm", "data", "verify", str(dataset)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "BAD" not in result.stdout and "match the manifest" in result.stdout


# ---- remote faults ------------------------------------------------------------------------


def test_http_404_is_missing_and_other_shards_still_read(dataset, clean):
    m_local = load_manifest(dataset)
    victim = m_local.split("train").shards[VICTIM]
    faults.remove(dataset / victim.path)
    with serve_directory(dataset.parent) as base:
        m = load_manifest(f"{base}/ds/")
        assert m.location == f"{base}/ds" and m.is_remote and m.path is None
        with pytest.raises(ShardError) as info:
            _reader(m, m.split("train").shards[VICTIM]).read(0)
        assert (info.value.kind, info.value.url, info.value.block) == ("missing", f"{base}/ds/{victim.path}", 0)
        assert "404" in str(info.value)
        shard0 = m.split("train").shards[0]
        assert np.array_equal(_reader(m, shard0).read(3), clean[1][shard0.path][3])
        problems = verify_dataset(f"{base}/ds", log=lambda *_: None)
        assert [(p.path, p.kind) for p in problems] == [(victim.path, "missing")]


@pytest.mark.parametrize("name", ["cut_in_header", "cut_at_member_boundary", "flip_bit", "empty"])
def test_faults_over_http_have_the_same_kinds(dataset, name):
    damage, kind, bad = FAULTS[name]
    shard_path = load_manifest(dataset).split("train").shards[VICTIM].path
    damage(dataset / shard_path)
    with serve_directory(dataset) as base:
        m = load_manifest(base)
        with pytest.raises(ShardError) as info:
            list(_reader(m, m.split("train").shards[VICTIM]).blocks())
        assert (info.value.kind, info.value.url, info.value.block) == (kind, f"{base}/{shard_path}", bad)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_after_retries():
    url = f"http://127.0.0.1:{_closed_port()}/ds/train-000000.tar"
    with pytest.raises(ShardError, match="unreachable after 3 attempts") as info:
        open_url(url, retries=2, backoff=0.01)
    assert (info.value.kind, info.value.url, info.value.block_local) == ("unreachable", url, False)


def test_server_errors_are_retried(dataset):
    with serve_directory(dataset, fail_first=2) as base:
        assert load_manifest(base).split("train").rows > 0  # two 503s, then the answer
    with serve_directory(dataset, fail_first=100) as base:
        with pytest.raises(ShardError, match="HTTP 503") as info:
            open_url(f"{base}/manifest.json", retries=1, backoff=0.01)
        assert info.value.kind == "unreachable"


def test_a_failing_pipe_command_is_its_own_error(tmp_path):
    url = f"pipe:cat {tmp_path}/nope.tar"
    with pytest.raises(ShardError, match="exited with status 1.*nope.tar") as info:
        ShardReader(url, dtype=np.uint16, row_len=33, allow_pipe=True).read(0)
    assert (info.value.kind, info.value.url) == ("unreachable", url)


# ---- the error type ----------------------------------------------------------------------


def test_shard_error_kinds_and_pickling():
    assert ShardError("x").kind == "corrupt_frame" and ShardError("x").block_local  # the one-argument form
    local = {k for k in ERROR_KINDS if ShardError("x", kind=k).block_local}
    assert local == {"corrupt_frame", "truncated_frame", "row_count"}
    with pytest.raises(ValueError, match="unknown ShardError kind"):
        ShardError("x", kind="bad")
    # Loader workers send errors to the main process by pickling: the attributes must survive.
    e = pickle.loads(pickle.dumps(ShardError("boom", kind="short", url="http://h/s.tar", block=3)))
    assert (str(e), e.kind, e.url, e.block) == ("boom", "short", "http://h/s.tar", 3)
    assert isinstance(e, RuntimeError)


def test_fault_helpers_keep_the_archive_valid_where_they_should(dataset):
    """missing_field, duplicate_key and truncate_frame damage the content, not the tar: standard
    tools still list the archive, so only the distlm checks can tell."""
    shards = load_manifest(dataset).split("train").shards
    for i, damage in enumerate([lambda p: faults.missing_field(p, 1), lambda p: faults.duplicate_key(p, 1),
                                lambda p: faults.truncate_frame(p, 1), faults.zero_samples], start=1):
        path = dataset / shards[i].path
        damage(path)
        names = [t.name for t in faults.members(path)]
        if shutil.which("tar"):
            listed = subprocess.run(["tar", "tf", str(path)], capture_output=True, text=True, check=True).stdout
            assert listed.split() == names


def test_cut_helpers(tmp_path):
    """The cut helpers cut where they say: inside data, inside a header, at a boundary."""
    src = tmp_path / "s.tar"
    faults._rewrite(src, [(f"{i:08d}.tokens.zst", bytes([i]) * 600) for i in range(3)])
    ms = faults.members(src)
    for cut, expected in [(faults.cut_mid_member, ms[1].offset_data + 300), (faults.cut_in_header, ms[1].offset + 100),
                          (lambda p, member: faults.cut_at_member_boundary(p, keep_members=member), ms[1].offset)]:
        path = tmp_path / "c.tar"
        shutil.copy(src, path)
        assert cut(path, member=1) == expected == os.path.getsize(path)
    faults.make_empty(path)
    assert path.stat().st_size == 0


def test_a_connection_dropped_mid_shard_resumes_with_a_range_request(tmp_path):
    """Each of the first two shard downloads is cut off half-way: the reader reconnects from the
    byte it reached and reads every block intact (no damaged block, no stopped run)."""
    from distlm.data.shards import ShardReader, load_manifest
    from remote_server import serve_directory

    (tmp_path / "t.txt").write_text("a dropped connection resumes " * 2000)
    from distlm.data.prepare import prepare_corpus

    prepare_corpus([str(tmp_path / "t.txt")], str(tmp_path / "ds"), seq_len=32, val_fraction=0, block_rows=16,
                   log=lambda _m: None)
    local = load_manifest(tmp_path / "ds")
    shard = local.split("train").shards[0]
    expected = [local_rows for _, local_rows in ShardReader(
        local.shard_url(shard), dtype=local.np_dtype, row_len=local.row_len, block_rows=shard.block_rows).blocks()]
    with serve_directory(tmp_path, drop_first=2) as base:
        remote = load_manifest(f"{base}/ds")  # the manifest is small: served whole, not dropped
        got = [rows for _, rows in ShardReader(remote.shard_url(shard), dtype=remote.np_dtype,
                                               row_len=remote.row_len, block_rows=shard.block_rows).blocks()]
        assert base.state["requests"] == 4  # manifest and shard, each cut off once and fetched again
    assert len(got) == len(expected) and all(np.array_equal(a, b) for a, b in zip(got, expected))


def test_a_dropped_download_continues_from_the_byte_it_reached(tmp_path):
    from distlm.data.remote import open_url
    from remote_server import serve_directory

    payload = bytes(range(256)) * 8000
    (tmp_path / "f.bin").write_bytes(payload)
    with serve_directory(tmp_path, drop_first=1) as base:
        stream = open_url(f"{base}/f.bin")
        got = b"".join(iter(lambda: stream.read(4096), b""))
        stream.close()
        assert base.state["ranges"] == 1  # the second request asked only for the rest
    assert got == payload
