"""FileWriter: objects streamed through torch.save, hashed while written, cut where a fault is planned."""

import hashlib

import pytest
import torch

from distlm.checkpoint import files
from distlm.checkpoint.files import FileWriter, serialize
from distlm.checkpoint.safe_load import load_file
from distlm.fault import inject
from distlm.fault.inject import Fault

STEP = 3


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 64 KiB so a few MB of tensors go through every path (gathered, hashed aside, cut)."""
    monkeypatch.setattr(files, "CHUNK", 64 << 10)
    monkeypatch.setattr(files, "GATHER", 16 << 10)
    monkeypatch.setattr(files, "HASH_ASIDE", 8 << 10)


def _state():
    g = torch.Generator().manual_seed(0)
    return {"big": torch.randn(300_000, generator=g), "small": torch.randn(10, generator=g),
            "view": torch.arange(100_000.0)[::2], "nested": [{"lr": 0.1, "t": torch.ones(5000)}], "n": 7}


def test_a_streamed_object_is_the_bytes_serialize_makes_and_its_record_hashes_them(tmp_path, small_chunks):
    writer = FileWriter(tmp_path, STEP)
    state = _state()
    writer.write_object(tmp_path / "a.pt", state)
    writer.write(tmp_path / "sub" / "b.json", b'{"x": 1}')
    writer.write(tmp_path / "empty", b"")
    writer.finish()
    assert writer.error is None
    assert (tmp_path / "a.pt").read_bytes() == serialize(state)
    for name in ("a.pt", "sub/b.json", "empty"):
        data = (tmp_path / name).read_bytes()
        assert writer.records[name] == files.FileRecord(len(data), hashlib.sha256(data).hexdigest())
    assert writer.bytes_written == sum(r.size for r in writer.records.values())
    loaded = load_file(tmp_path / "a.pt")
    assert torch.equal(loaded["big"], state["big"]) and torch.equal(loaded["view"], state["view"])


def test_the_fault_hook_is_hit_before_every_chunk_and_a_planned_offset_is_a_chunk_boundary(tmp_path, small_chunks,
                                                                                              monkeypatch):
    cut = 200_003
    monkeypatch.setattr(inject, "planned_offset",
                        lambda phase, step: cut if (phase, step) == ("save.write", STEP) else None)
    hits = []
    monkeypatch.setattr(inject, "hit", lambda phase, step, offset=None: hits.append((phase, step, offset)))
    writer = FileWriter(tmp_path, STEP)
    writer.write(tmp_path / "first", b"x" * 1000)
    writer.write_object(tmp_path / "a.pt", _state())
    offsets = [offset for _, _, offset in hits]
    assert all(phase == "save.write" and step == STEP for phase, step, _ in hits)
    assert offsets[0] == 0 and cut in offsets
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)
    assert all(b - a <= files.CHUNK for a, b in zip(offsets, offsets[1:] + [writer.bytes_written]))
    assert writer.bytes_written == 1000 + (tmp_path / "a.pt").stat().st_size


def test_enospc_at_a_planned_offset_leaves_exactly_the_bytes_before_it(tmp_path, small_chunks, monkeypatch):
    cut = 150_001
    monkeypatch.setattr(inject, "_FAULTS", [Fault(rank=0, step=STEP, phase="save.write", offset=cut, signal="ENOSPC")])
    writer = FileWriter(tmp_path, STEP)
    state = _state()
    writer.write(tmp_path / "first", b"x" * 1000)
    writer.write_object(tmp_path / "a.pt", state)
    writer.write(tmp_path / "after", b"y")
    assert "No space left on device" in writer.error and "a.pt" in writer.error
    assert list(writer.records) == ["first"]
    assert writer.bytes_written == cut
    assert (tmp_path / "a.pt").read_bytes() == serialize(state)[: cut - 1000]
    assert not (tmp_path / "after").exists()


def test_an_object_that_cannot_be_serialized_is_kept_as_an_error(tmp_path):
    writer = FileWriter(tmp_path, STEP)
    writer.write_object(tmp_path / "bad.pt", {"f": lambda: 0})
    assert writer.error.startswith(f"serializing {tmp_path / 'bad.pt'}: ") and not writer.records
