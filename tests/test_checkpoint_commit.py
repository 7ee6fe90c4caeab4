"""The commit's write order (matrix row 6), seen through a recording of the real system calls.

A kill test cannot see a missing fsync (the page cache survives a killed process; only a power
cut or a kernel crash loses it), so the order is checked here: data -> fsync -> folder fsync ->
manifest -> fsync -> rename -> parent fsync -> latest (tmp, fsync, rename, parent fsync).
"""

import builtins
import os
from pathlib import Path

import pytest
import torch

from distlm.checkpoint.commit import commit
from distlm.checkpoint.files import FileWriter, serialize
from distlm.checkpoint.manifest import build


@pytest.fixture
def calls(monkeypatch):
    """Record writes, fsyncs (by path) and renames; every call still does its real work."""
    seen = []
    real_open, real_fsync, real_rename, real_replace = builtins.open, os.fsync, os.rename, os.replace

    def opening(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax"):
            seen.append(("write", Path(file).name))
        return real_open(file, mode, *args, **kwargs)

    def fsync(fd):
        seen.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name))
        return real_fsync(fd)

    def rename(src, dst):
        seen.append(("rename", Path(src).name, Path(dst).name))
        return real_rename(src, dst)

    def replace(src, dst):
        seen.append(("rename", Path(src).name, Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(builtins, "open", opening)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return seen


def test_files_folder_manifest_rename_and_latest_reach_the_disk_in_order(tmp_path, calls):
    ckpt = tmp_path / "checkpoints"
    tmp = ckpt / "step-00000007.tmp"
    tmp.mkdir(parents=True)
    writer = FileWriter(tmp, 7)
    writer.write(tmp / "a.pt", serialize({"x": torch.ones(3)}))
    writer.write(tmp / "b.pt", serialize({"y": torch.zeros(3)}))
    writer.finish()
    commit(tmp, build(7, writer.records, {}, {}))

    assert calls == [
        ("write", "a.pt"), ("fsync", "a.pt"),
        ("write", "b.pt"), ("fsync", "b.pt"),
        ("fsync", "step-00000007.tmp"),                       # the data files' directory entries
        ("write", "manifest.json"), ("fsync", "manifest.json"),
        ("fsync", "step-00000007.tmp"),                       # the manifest's entry
        ("rename", "step-00000007.tmp", "step-00000007"),
        ("fsync", "checkpoints"),                             # the rename itself
        ("write", "latest.tmp"), ("fsync", "latest.tmp"),
        ("rename", "latest.tmp", "latest"),
        ("fsync", "checkpoints"),
    ]
    assert (ckpt / "latest").read_text() == "step-00000007"


def test_a_failed_write_is_kept_not_raised_and_nothing_after_it_is_written(tmp_path, monkeypatch):
    """ENOSPC in the middle of a rank's files (row 8, through a mock of the write)."""
    import errno

    tmp = tmp_path / "step-00000001.tmp"
    tmp.mkdir()
    writer = FileWriter(tmp, 1)
    writer.write(tmp / "first.pt", b"x" * 100)
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    monkeypatch.setattr(builtins, "open", lambda *a, **k: FullDisk(real_open(*a, **k)))
    writer.write(tmp / "second.pt", b"y" * 100)
    writer.write(tmp / "third.pt", b"z" * 100)
    assert "No space left on device" in writer.error and "second.pt" in writer.error
    assert list(writer.records) == ["first.pt"]
    assert not (tmp / "third.pt").exists()


def test_a_background_write_that_fails_in_any_way_fails_the_save(tmp_path):
    """Not only OSError: an object that cannot be serialized must not leave a 'successful' save."""
    from distlm.checkpoint.saver import _InFlight

    tmp = tmp_path / "step-00000002.tmp"
    tmp.mkdir()
    flight = _InFlight(2, tmp, FileWriter(tmp, 2), {})
    flight.pending = [(tmp / "good.pt", {"x": torch.ones(2)}, False), (tmp / "bad.pt", {"f": lambda: 0}, False),
                      (tmp / "after.pt", {"y": torch.ones(2)}, False)]
    flight.write_pending()
    assert "serializing" in flight.writer.error and "bad.pt" in flight.writer.error
    assert list(flight.writer.records) == ["good.pt"]


def test_an_async_snapshot_is_a_copy_that_keeps_deepspeeds_types():
    from collections import OrderedDict, namedtuple

    from distlm.checkpoint.files import snapshot

    Address = namedtuple("Address", "start numel")
    live = torch.zeros(4)
    state = OrderedDict(w=live, shape=torch.Size([2, 2]), where=Address(0, 4), groups=[{"lr": 0.1, "t": live[:2]}])
    copy = snapshot(state)
    live += 1
    assert torch.equal(copy["w"], torch.zeros(4)) and torch.equal(copy["groups"][0]["t"], torch.zeros(2))
    assert type(copy) is OrderedDict and type(copy["shape"]) is torch.Size and copy["where"] == Address(0, 4)
    assert type(copy["where"]) is Address and copy["shape"].numel() == 4


def test_async_snapshots_copy_into_the_previous_saves_memory():
    """The training thread is blocked for the snapshot's copy: into memory already mapped, not fresh pages."""
    from distlm.checkpoint.files import HostBuffers, snapshot

    buffers = HostBuffers()
    live = {"w": torch.arange(6.0).view(2, 3), "t": torch.arange(8.0)[::2], "step": 3}  # "t" is strided
    first = snapshot(live, buffers)
    assert torch.equal(first["t"], live["t"])
    buffers.give_back(first)  # written: its tensors go back
    live["w"] += 10
    second = snapshot(live, buffers)
    assert second["w"].data_ptr() == first["w"].data_ptr()  # the same memory, refilled
    assert torch.equal(second["w"], torch.arange(6.0).view(2, 3) + 10) and second["step"] == 3
    live["w"] += 1
    assert torch.equal(second["w"], torch.arange(6.0).view(2, 3) + 10)  # still a copy, not a view
    assert torch.equal(second["t"], torch.tensor([0.0, 2.0, 4.0, 6.0]))
    third = snapshot(live, buffers)  # nothing given back since: new memory, never the snapshot in flight
    assert third["w"].data_ptr() != second["w"].data_ptr()
