"""Writing one rank's checkpoint files: fsync'd, hashed while written, failures kept not raised.

Every file of a checkpoint (DeepSpeed's and distlm's) goes through a :class:`FileWriter`:

* the bytes are written in chunks, flushed and fsync'd; the folder is fsync'd after the files,
  so the manifest that follows can only vouch for data that is on disk;
* the SHA-256 and size are computed from the bytes written (no second read) for the manifest;
* an object is streamed: ``torch.save`` writes into the file as it serializes (no copy of the
  whole file in memory first), and each large chunk is hashed on a second thread while it is
  written (hashlib and the write both release the GIL), so hashing costs no time of its own;
* an ``OSError`` (a full disk, a quota, a lost mount) does not escape: it is kept, the rest of
  the save is skipped, and the ranks decide together afterwards (an exception on one rank in
  the middle of DeepSpeed's save would leave the others waiting in its collectives).
"""

from __future__ import annotations

import copy
import errno
import hashlib
import io
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from distlm.fault import inject
from distlm.fsutil import fsync_dir

CHUNK = 4 << 20
# torch.save hands its output over in pieces: record headers of a few bytes, pickles, and each
# tensor's storage whole. Pieces below GATHER are gathered into one write (up to CHUNK).
GATHER = 1 << 20
# Chunks from this size on are hashed on the hashing thread while they are written; smaller
# ones, where starting the thread would cost more than it saves, on the writing thread.
HASH_ASIDE = 256 << 10


@dataclass
class FileRecord:
    size: int
    sha256: str


def serialize(obj) -> bytes:
    """``torch.save`` into memory: the bytes :meth:`FileWriter.write_object` streams to disk for ``obj``."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


class HostBuffers:
    """Host tensors kept from one asynchronous save for the next one's snapshot.

    Copying a checkpoint's state into freshly allocated host memory is mostly page faults (the
    kernel maps every page on first touch): 0.16 s for 420 MB here, against 0.05 s into memory
    already mapped. The training thread is blocked for exactly that copy, so the tensors of a
    written snapshot come back here (:meth:`give_back`) and the next snapshot copies into them;
    every save has the same shapes. The cost: one host copy of the rank's state stays allocated
    between saves (each save needs it anyway). On a GPU the buffers are pinned, which also
    makes the device-to-host copy faster.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def copy_of(self, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.detach()
        if not tensor.is_contiguous() or tensor.is_sparse:
            return tensor.to("cpu", copy=True)  # kept as it is: a strided copy preserves its layout
        key = (tuple(tensor.shape), tensor.dtype)
        with self._lock:
            free = self._free.get(key)
            buffer = free.pop() if free else None
        if buffer is None:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)
        return buffer.copy_(tensor)

    def give_back(self, obj) -> None:
        """Keep the tensors of a snapshot that is on disk now (containers are walked)."""
        if isinstance(obj, torch.Tensor):
            if obj.device.type == "cpu" and obj.is_contiguous() and not obj.is_sparse:
                with self._lock:
                    self._free.setdefault((tuple(obj.shape), obj.dtype), []).append(obj)
        elif isinstance(obj, dict):
            for value in obj.values():
                self.give_back(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                self.give_back(value)


def snapshot(obj, buffers: Optional[HostBuffers] = None):
    """A host-memory copy of a state object: what an asynchronous save keeps of its step.

    One copy per tensor (a device-to-host copy on a GPU; into ``buffers``' tensors when given),
    containers rebuilt, small objects deep-copied; serialization then happens in the background.
    Tensors that shared storage are saved as separate tensors, as DeepSpeed's own pipeline save
    does (loading copies values).
    """
    if isinstance(obj, torch.Tensor):
        return buffers.copy_of(obj) if buffers is not None else obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        copied = type(obj)() if type(obj) in (dict, OrderedDict) else {}
        for key, value in obj.items():
            copied[key] = snapshot(value, buffers)
        return copied
    if isinstance(obj, list):
        return [snapshot(v, buffers) for v in obj]
    if isinstance(obj, torch.Size):
        return obj  # immutable; DeepSpeed's param_shapes are read back as torch.Size
    if isinstance(obj, tuple):
        items = [snapshot(v, buffers) for v in obj]
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


class _Stream:
    """One file being written: what ``torch.save`` writes into, and plain bytes go through.

    Every byte goes out through :meth:`_put` in order: cut into CHUNK pieces (and where a
    planned ``save.write`` fault fires), the fault hook hit before each piece, the piece
    written whole (unbuffered: a kill leaves exactly what was written) and hashed. A piece's
    memory belongs to the caller (``torch.save`` passes views of tensor storage and of its own
    buffers): it is never kept past the ``write`` call that handed it over. An ``OSError`` is
    kept in ``error`` (``torch.save`` turns what its writer raises into a RuntimeError).
    """

    def __init__(self, writer: "FileWriter", f, hasher: ThreadPoolExecutor) -> None:
        self.writer, self.f, self.hasher = writer, f, hasher
        self.digest = hashlib.sha256()
        self.size = 0
        self.error: Optional[OSError] = None
        self._gathered = bytearray()
        self._cut = inject.planned_offset("save.write", writer.step)

    def write(self, data) -> int:
        if self.error is not None:
            raise self.error
        view = memoryview(data)
        if view.ndim != 1 or view.format not in ("B", "b", "c"):
            view = view.cast("B")
        try:
            if view.nbytes < GATHER:
                self._gathered += view
                if len(self._gathered) >= CHUNK:
                    self._drain()
            else:
                self._drain()
                self._put(view)
        except OSError as e:
            self.error = e
            raise
        return view.nbytes

    def flush(self) -> None:
        """``torch.save`` flushes at its end; :meth:`close` writes what is still gathered."""

    def close(self) -> None:
        try:
            self._drain()
        except OSError as e:
            self.error = e
            raise

    def _drain(self) -> None:
        if self._gathered:
            gathered, self._gathered = self._gathered, bytearray()
            self._put(memoryview(gathered))

    def _put(self, view: memoryview) -> None:
        writer = self.writer
        for piece in self._chunks(view):
            inject.hit("save.write", writer.step, writer.bytes_written)
            hashing = self.hasher.submit(self.digest.update, piece) if len(piece) >= HASH_ASIDE else None
            try:
                self._write_all(piece)
            finally:
                if hashing is not None:
                    hashing.result()  # the piece is the caller's memory: done with it before returning
            if hashing is None:
                self.digest.update(piece)
            writer.bytes_written += len(piece)
            self.size += len(piece)

    def _write_all(self, piece: memoryview) -> None:
        while len(piece):
            n = self.f.write(piece)
            if not n:
                raise OSError(errno.EIO, f"short write ({n!r} of {len(piece)} bytes)")
            piece = piece[n:]

    def _chunks(self, view: memoryview):
        """CHUNK-sized pieces, also cut where a planned fault fires (so it lands on its byte)."""
        done = self.writer.bytes_written
        start = 0
        while start < len(view):
            end = min(start + CHUNK, len(view))
            if self._cut is not None and done < self._cut < done + (end - start):
                end = start + self._cut - done
            yield view[start:end]
            done += end - start
            start = end


@dataclass
class FileWriter:
    """Writes files under ``folder`` for the checkpoint of ``step``; see the module docstring."""

    folder: Path
    step: int
    records: dict[str, FileRecord] = field(default_factory=dict)
    error: Optional[str] = None
    bytes_written: int = 0

    def write(self, path: str | os.PathLike, data: bytes) -> None:
        self._write(path, lambda stream: stream.write(data))

    def write_object(self, path: str | os.PathLike, obj) -> None:
        """Serialize ``obj`` (unless it is bytes already) into the file; a failure is kept like a write's."""
        if isinstance(obj, bytes):
            self.write(path, obj)
        else:
            self._write(path, lambda stream: torch.save(obj, stream))

    def _write(self, path: str | os.PathLike, produce) -> None:
        if self.error is not None:
            return  # the save already failed on this rank; the ranks agree on it afterwards
        path = Path(path)
        name = path.relative_to(self.folder).as_posix()
        stream = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with ThreadPoolExecutor(1, thread_name_prefix="distlm-save-hash") as hasher:
                with open(path, "wb", buffering=0) as f:  # unbuffered: a kill leaves exactly what was written
                    stream = _Stream(self, f, hasher)
                    produce(stream)
                    stream.close()
                    os.fsync(f.fileno())
        except Exception as e:  # on one rank only: raising would leave the others in a collective
            if stream is not None and stream.error is not None:
                self.error = f"writing {path}: {stream.error}"
            elif isinstance(e, OSError):
                self.error = f"writing {path}: {e}"
            else:
                self.error = f"serializing {path}: {type(e).__name__}: {e}"
            return
        self.records[name] = FileRecord(stream.size, stream.digest.hexdigest())

    def finish(self) -> None:
        """Make the new directory entries durable (a renamed folder of unsynced entries is not)."""
        if self.error is None:
            for folder in sorted({self.folder / Path(n).parent for n in self.records}, reverse=True):
                fsync_dir(folder)
