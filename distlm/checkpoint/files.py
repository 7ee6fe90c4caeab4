"""Writing one rank's checkpoint files: fsync'd, hashed while written, failures kept not raised.

Every file of a checkpoint (DeepSpeed's and distlm's) goes through a :class:`FileWriter`:

* the bytes are written in chunks, flushed and fsync'd; the folder is fsync'd after the files,
  so the manifest that follows can only vouch for data that is on disk;
* the SHA-256 and size are computed from the bytes written (no second read) for the manifest;
* an ``OSError`` (a full disk, a quota, a lost mount) does not escape: it is kept, the rest of
  the save is skipped, and the ranks decide together afterwards (an exception on one rank in
  the middle of DeepSpeed's save would leave the others waiting in its collectives).
"""

from __future__ import annotations

import copy
import hashlib
import io
import os
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from distlm.fault import inject
from distlm.fsutil import fsync_dir

CHUNK = 4 << 20


@dataclass
class FileRecord:
    size: int
    sha256: str


def serialize(obj) -> bytes:
    """``torch.save`` into memory: the bytes that go to disk, and the snapshot an async save keeps."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def snapshot(obj):
    """A host-memory copy of a state object: what an asynchronous save keeps of its step.

    One copy per tensor (a device-to-host copy on a GPU), containers rebuilt, small objects
    deep-copied; serialization then happens in the background. Tensors that shared storage are
    saved as separate tensors, as DeepSpeed's own pipeline save does (loading copies values).
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for key, value in obj.items():
            copied[key] = snapshot(value)
        return copied
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, torch.Size):
        return obj  # immutable; DeepSpeed's param_shapes are read back as torch.Size
    if isinstance(obj, tuple):
        items = [snapshot(v) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if obj is None or isinstance(obj, (str, bytes, int, float, bool)):
        return obj
    return copy.deepcopy(obj)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class FileWriter:
    """Writes files under ``folder`` for the checkpoint of ``step``; see the module docstring."""

    folder: Path
    step: int
    records: dict[str, FileRecord] = field(default_factory=dict)
    error: Optional[str] = None
    bytes_written: int = 0

    def write(self, path: str | os.PathLike, data: bytes) -> None:
        if self.error is not None:
            return  # the save already failed on this rank; the ranks agree on it afterwards
        path = Path(path)
        name = path.relative_to(self.folder).as_posix()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            digest = hashlib.sha256()
            with open(path, "wb", buffering=0) as f:  # unbuffered: a kill leaves exactly what was written
                for chunk in self._chunks(memoryview(data)):
                    inject.hit("save.write", self.step, self.bytes_written)
                    f.write(chunk)
                    digest.update(chunk)
                    self.bytes_written += len(chunk)
                os.fsync(f.fileno())
        except OSError as e:
            self.error = f"writing {path}: {e}"
            return
        self.records[name] = FileRecord(len(data), digest.hexdigest())

    def write_object(self, path: str | os.PathLike, obj) -> None:
        """Serialize ``obj`` (unless it is bytes already) and write it; a failure is kept like a write's."""
        if self.error is not None:
            return
        try:
            data = obj if isinstance(obj, bytes) else serialize(obj)
        except Exception as e:  # on one rank only: raising would leave the others in a collective
            self.error = f"serializing {path}: {type(e).__name__}: {e}"
            return
        self.write(path, data)

    def _chunks(self, view: memoryview):
        """CHUNK-sized pieces, also cut where a planned fault fires (so it lands on its byte)."""
        cut = inject.planned_offset("save.write", self.step)
        start = 0
        while start < len(view):
            end = min(start + CHUNK, len(view))
            if cut is not None and self.bytes_written < cut < self.bytes_written + (end - start):
                end = start + cut - self.bytes_written
            yield view[start:end]
            start = end

    def finish(self) -> None:
        """Make the new directory entries durable (a renamed folder of unsynced entries is not)."""
        if self.error is None:
            for folder in sorted({self.folder / Path(n).parent for n in self.records}, reverse=True):
                fsync_dir(folder)
