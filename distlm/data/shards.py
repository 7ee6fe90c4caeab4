"""The on-disk format of a prepared dataset: WebDataset tar shards of zstd blocks, and a manifest.

A dataset folder holds::

    manifest.json        what is there (written last: its presence means the folder is complete)
    tokenizer.json       the tokenizer that produced the ids
    train-000000.tar     WebDataset shards; each member is one *block*
    val-000000.tar

A block is the tar member ``{key}.tokens.zst`` with ``key = "%08d" % block_index``: one zstd
frame (with content size and checksum) of a C-contiguous little-endian array
``[rows, row_len]`` of uint16 (vocab <= 65536) or uint32. The checksum turns bit rot into a
:class:`ShardError` instead of silently wrong training data; the content size lets a reader
refuse a damaged header before allocating memory for it.

The manifest records, per split, ``rows`` (rows of ``row_len = seq_len + 1`` ids), ``tokens``
(ids of the split's stream), ``dropped_tokens`` (the tail too short for another row) and each
shard's ``path``, ``rows``, ``tokens`` (ids stored: rows x row_len), ``block_rows`` (rows per
member, in order), ``bytes`` and ``sha256``.
Readers use the row counts to find a position without opening the shards before it.

Files are written atomically (``*.tmp``, fsync, rename) so a crash leaves either the old file
or the new one, never a torn one.

Reading trusts nothing it can check. Neither tar nor zstd reliably reports damage on its own:
a tar cut inside a header looks like a clean end of archive, and a zstd frame cut short
decodes to short data without an error. So :class:`ShardReader` checks every member against
what must be there (keys ``0, 1, 2, ...`` in order, one ``tokens.zst`` field each, as many
blocks as the manifest lists), and every frame against its own header (whole length, content
size, checksum) and the manifest's row count. Each fault is a :class:`ShardError` whose
``kind`` (one of :data:`ERROR_KINDS`) says what broke and whether the rest of the shard is
still readable. A dataset can live in a folder or behind a URL (``http(s)://``, ``file://``,
opt-in ``pipe:``; see :mod:`distlm.data.remote`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import http.client
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

import numpy as np
import zstandard as zstd

from distlm.fsutil import atomic_write_bytes, fsync_dir

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST_NAME",
    "TOKENIZER_NAME",
    "BLOCK_SUFFIX",
    "ERROR_KINDS",
    "ShardError",
    "ShardInfo",
    "SplitInfo",
    "Manifest",
    "ShardWriter",
    "ShardReader",
    "TarMemberReader",
    "dtype_for_vocab",
    "block_member_name",
    "encode_block",
    "decode_block",
    "decode_block_into",
    "iter_shard_blocks",
    "write_manifest",
    "load_manifest",
    "shard_file_name",
]

FORMAT = "distlm.shards"
VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
BLOCK_SUFFIX = "tokens.zst"
ZSTD_LEVEL = 3

_KEY_RE = re.compile(r"^(\d{8})\." + re.escape(BLOCK_SUFFIX) + r"$")
_REDO = "re-copy it or re-run `distlm prepare`"

ERROR_KINDS = (
    "missing", "empty", "truncated", "short", "zero_samples", "missing_field",
    "duplicate_key", "corrupt_frame", "truncated_frame", "row_count", "checksum", "unreachable",
)
"""Every :attr:`ShardError.kind`, so a reader can keep one counter per kind:

* ``missing``: the file or URL does not exist (404).
* ``empty``: a 0-byte file.
* ``truncated``: the archive cannot be read on from some point: it ends inside a member (data
  shorter than its header says) or inside a header, or a header is damaged (checksum).
* ``short``: the archive ends cleanly (at a member boundary) but lacks blocks the manifest
  lists, or skips a key.
* ``zero_samples``: a valid archive with no members at all.
* ``missing_field``: a member that is not ``KEY.tokens.zst`` (the sample lacks the field).
* ``duplicate_key``: a key repeated (keys must be 0, 1, 2, ... in order).
* ``corrupt_frame``: a zstd frame that fails its checksum or is not a valid frame.
* ``truncated_frame``: a zstd frame shorter than its own header says.
* ``row_count``: a block holding another number of rows than the manifest's ``block_rows``,
  or more blocks than the manifest lists.
* ``checksum``: the file's size or sha256 differs from the manifest (``distlm data verify``).
* ``unreachable``: a network or I/O error that persisted through the retries, or a ``pipe:``
  command that failed.
"""

_BLOCK_LOCAL = frozenset({"corrupt_frame", "truncated_frame", "row_count"})


class ShardError(RuntimeError):
    """A shard is missing, truncated or corrupt. The message names the file and what to do.

    ``kind`` (one of :data:`ERROR_KINDS`) classifies the fault so the training stream can
    count and skip it; ``url`` is the shard's path or URL; ``block`` is the block the fault was
    found at (None when it concerns the whole file or is unknown). The attributes survive
    pickling, so an error raised in a loader worker process keeps them.
    """

    def __init__(self, message: str, *, kind: str = "corrupt_frame", url: str = "",
                 block: Optional[int] = None):
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown ShardError kind {kind!r}; known kinds: {', '.join(ERROR_KINDS)}")
        super().__init__(message)
        self.kind = kind
        self.url = url
        self.block = block

    @property
    def block_local(self) -> bool:
        """True when only block ``block`` is bad and the shard can still be read past it
        (``corrupt_frame``, ``truncated_frame``, ``row_count``); False when the shard cannot be
        read at or after ``block``."""
        return self.kind in _BLOCK_LOCAL

    def copy(self) -> "ShardError":
        """A fresh exception with the same message and attributes, to raise again."""
        return ShardError(str(self), kind=self.kind, url=self.url, block=self.block)


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The narrowest stored dtype that holds every id: uint16 up to 65536 ids, else uint32."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def shard_file_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def block_member_name(block_index: int) -> str:
    return f"{block_index:08d}.{BLOCK_SUFFIX}"


def encode_block(rows: np.ndarray) -> bytes:
    """One zstd frame of a 2-D ``[rows, row_len]`` uint16/uint32 array (little-endian)."""
    if rows.ndim != 2:
        raise ValueError(f"a block is a 2-D [rows, row_len] array, got shape {rows.shape}")
    if rows.dtype.kind != "u" or rows.dtype.itemsize not in (2, 4):
        raise ValueError(f"a block holds uint16 or uint32 ids, got {rows.dtype}")
    data = np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<"))
    compressor = zstd.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True, write_content_size=True)
    return compressor.compress(data.tobytes())




_FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
_MAX_FRAME_HEADER = 18  # magic 4 + descriptor 1 + window 1 + dictionary id 4 + content size 8


def _check_frame(data: bytes, where: str, redo: str) -> int:
    """The content size of the zstd frame ``data``, after checking its shape; else ShardError.

    zstd itself does not report a frame cut short: a stream read returns the bytes decoded so
    far and no error, and a frame cut inside its 4-byte checksum decodes completely without
    the checksum ever being compared. So the block headers are walked (a few per MiB) to find
    where the frame must end, and ``data`` must end exactly there. A frame without a checksum
    is refused too: its bit flips would pass unseen.
    """
    try:
        size = zstd.frame_content_size(data)
        header = zstd.frame_header_size(data)
        has_checksum = zstd.get_frame_parameters(data).has_checksum
    except zstd.ZstdError as exc:
        if len(data) < _MAX_FRAME_HEADER and _FRAME_MAGIC.startswith(bytes(data[:4])):
            raise ShardError(f"{where}: zstd frame cut off inside its header ({len(data)} bytes); {redo}",
                             kind="truncated_frame") from exc
        raise ShardError(f"{where}: not a readable zstd frame ({exc}); {redo}", kind="corrupt_frame") from exc
    if size < 0:
        raise ShardError(f"{where}: zstd frame does not record its size; {redo}", kind="corrupt_frame")
    if not has_checksum:
        raise ShardError(f"{where}: zstd frame has no checksum, so damage to it could not be detected; {redo}",
                         kind="corrupt_frame")
    pos, n, blocks = header, len(data), 0
    while True:
        if pos + 3 > n:
            raise ShardError(f"{where}: zstd frame is truncated ({n} bytes end inside block {blocks}); {redo}",
                             kind="truncated_frame")
        block_header = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
        block_type = (block_header >> 1) & 3
        if block_type == 3:
            raise ShardError(f"{where}: zstd block {blocks} has the reserved type 3; {redo}", kind="corrupt_frame")
        pos += 3 + (1 if block_type == 1 else block_header >> 3)  # an RLE block stores one byte
        blocks += 1
        if block_header & 1:
            break
    pos += 4 if has_checksum else 0
    if pos > n:
        raise ShardError(f"{where}: zstd frame is truncated ({n} of {pos} bytes); {redo}", kind="truncated_frame")
    if pos < n:
        raise ShardError(f"{where}: {n - pos} unexpected bytes after the zstd frame; {redo}", kind="corrupt_frame")
    if size > blocks * zstd.BLOCKSIZE_MAX:
        raise ShardError(f"{where}: zstd frame header claims {size} bytes but its {blocks} blocks hold at most "
                         f"{blocks * zstd.BLOCKSIZE_MAX}; {redo}", kind="corrupt_frame")
    return size


def decode_block(
    data: bytes,
    *,
    dtype: np.dtype | str,
    row_len: int,
    where: str,
    expected_rows: Optional[int] = None,
) -> np.ndarray:
    """The ``[rows, row_len]`` array of one block; ``where`` names it ("shard.tar member") in errors.

    Raises :class:`ShardError` on a truncated (kind ``truncated_frame``) or corrupt frame
    (``corrupt_frame``: checksum mismatch, bad header), a size that is not a whole number of
    rows, or (given ``expected_rows``) a row count the manifest disagrees with (``row_count``).
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    row_bytes = row_len * dtype.itemsize
    redo = f"the file is damaged; {_REDO}"
    size = _check_frame(data, where, redo)
    if expected_rows is not None and size != expected_rows * row_bytes:
        raise ShardError(
            f"{where}: block holds {size} bytes but the manifest expects {expected_rows} rows "
            f"x {row_len} x {dtype.itemsize} bytes = {expected_rows * row_bytes}; {redo}", kind="row_count"
        )
    if size % row_bytes or size == 0:
        raise ShardError(f"{where}: {size} bytes is not a whole number (>= 1) of rows of {row_bytes} bytes; {redo}",
                         kind="row_count")
    out = np.empty((size // row_bytes, row_len), dtype=dtype)
    decode_block_into(data, out, where=where)
    return out


def decode_block_into(data: bytes, out: np.ndarray, *, where: str) -> None:
    """Decompress one block straight into ``out``, a C-contiguous ``[rows, row_len]`` array of the
    stored dtype whose size the manifest gives. No intermediate buffer: the reader's window is
    filled in place. Raises :class:`ShardError` when the frame is corrupt (checksum; kind
    ``corrupt_frame``), truncated (``truncated_frame``), or holds another number of bytes than
    ``out`` (``row_count``). All three are block-local: the next block can still be read.
    """
    redo = f"the file is damaged; {_REDO}"
    if not out.flags.c_contiguous:
        raise ValueError("decode_block_into needs a C-contiguous output array")
    size = _check_frame(data, where, redo)
    if size != out.nbytes:
        rows = out.shape[0] if out.ndim else 1
        width = out.shape[1] if out.ndim > 1 else 1
        raise ShardError(
            f"{where}: block holds {size} bytes but the manifest expects {rows} rows x "
            f"{width} x {out.itemsize} bytes = {out.nbytes}; {redo}", kind="row_count"
        )
    target = out.reshape(-1).view(np.uint8)
    try:
        with _DECOMPRESSOR.stream_reader(data, read_across_frames=False) as reader:
            got = reader.readinto(target)
            while got < size:  # readinto may stop short of a whole frame; an empty read is the end
                n = reader.readinto(target[got:])
                if n == 0:
                    break
                got += n
            # One more read makes the decoder reach the end of the frame and compare the checksum
            # even when the last block's output already filled ``out``.
            extra = reader.read(1) if got == size else b""
    except zstd.ZstdError as exc:
        raise ShardError(f"{where}: corrupt zstd frame ({exc}); {redo}", kind="corrupt_frame") from exc
    if got != size:
        raise ShardError(f"{where}: zstd frame is truncated ({got} of {size} bytes); {redo}", kind="truncated_frame")
    if extra:
        raise ShardError(f"{where}: zstd frame decodes to more than the {size} bytes its header says; {redo}",
                         kind="corrupt_frame")


# A decompression context is reusable and not shared between threads here (loader workers are
# processes), so one per process saves setting it up for every block.
_DECOMPRESSOR = zstd.ZstdDecompressor()


# --------------------------------------------------------------------------------------------
# Writing

class _HashingFile:
    """A write-only file wrapper that counts and hashes bytes, so a shard is hashed while written."""

    def __init__(self, f: BinaryIO):
        self._f = f
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, b: bytes) -> int:
        self.sha256.update(b)
        self.bytes += len(b)
        return self._f.write(b)

    def flush(self) -> None:
        self._f.flush()


class _KeyAccess:
    """Lets ``info["rows"]`` read like the manifest JSON as well as ``info.rows``."""

    def __getitem__(self, key: str) -> Any:
        known = self.__dataclass_fields__  # type: ignore[attr-defined]
        if key not in known:
            raise KeyError(f"{key!r}: known keys are {', '.join(known)}")
        return getattr(self, key)


@dataclass
class ShardInfo(_KeyAccess):
    """One shard as listed in the manifest; ``path`` is relative to the dataset folder."""

    path: str
    rows: int
    block_rows: list[int]
    bytes: int
    sha256: str
    tokens: Optional[int] = None
    """Token ids stored, ``rows x row_len``; None in manifests that predate the field."""

    def to_dict(self) -> dict[str, Any]:
        out = {
            "path": self.path,
            "rows": self.rows,
            "tokens": self.tokens,
            "block_rows": list(self.block_rows),
            "bytes": self.bytes,
            "sha256": self.sha256,
        }
        if self.tokens is None:
            del out["tokens"]
        return out


class ShardWriter:
    """Writes one tar shard of blocks to ``path`` atomically (``path.tmp`` until :meth:`close`).

    ``close`` returns the :class:`ShardInfo` for the manifest; leaving the ``with`` block on an
    exception removes the temporary file instead.
    """

    def __init__(self, path: str | os.PathLike, *, dtype: np.dtype | str, row_len: int):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.row_len = row_len
        self.block_rows: list[int] = []
        self._tmp = self.path.with_name(self.path.name + ".tmp")
        self._file = open(self._tmp, "wb")
        self._hashing = _HashingFile(self._file)
        # mtime=0 makes shards byte-for-byte reproducible, so their sha256 is too.
        # Imported here: webdataset pulls in torch (seconds), which prepare's workers and the
        # readers never need.
        import webdataset as wds

        self._tar = wds.TarWriter(self._hashing, encoder=False, mtime=0, compress=False)
        self._tar_bytes = 0
        self._closed = False

    @property
    def bytes_written(self) -> int:
        """Size of the archive so far, counted per member (tarfile buffers ~10 KB before writing)."""
        return self._tar_bytes

    @property
    def rows(self) -> int:
        return sum(self.block_rows)

    def add_block(self, rows: np.ndarray) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.row_len or rows.shape[0] < 1:
            raise ValueError(f"block must be [rows >= 1, {self.row_len}], got {rows.shape}")
        self.add_encoded(encode_block(rows.astype(self.dtype, copy=False)), int(rows.shape[0]))

    def add_encoded(self, data: bytes, rows: int) -> None:
        """Append a block already compressed by :func:`encode_block` (e.g. in a worker process)."""
        if rows < 1:
            raise ValueError(f"a block holds at least one row, got {rows}")
        key = f"{len(self.block_rows):08d}"
        self._tar.write({"__key__": key, BLOCK_SUFFIX: data})
        self._tar_bytes += 512 + -(-len(data) // 512) * 512  # header + data padded to 512-byte records
        self.block_rows.append(rows)

    def close(self) -> ShardInfo:
        if self._closed:
            raise ValueError(f"shard writer for {self.path} is already closed")
        self._tar.close()  # writes the end-of-archive blocks through the hashing wrapper
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._closed = True
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return ShardInfo(
            path=self.path.name,
            rows=self.rows,
            block_rows=list(self.block_rows),
            bytes=self._hashing.bytes,
            sha256=self._hashing.sha256.hexdigest(),
            tokens=self.rows * self.row_len,
        )

    def abort(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            # Close the tar stream too, else its finalizer later writes to the closed file.
            self._tar.close()
        except Exception:
            pass
        try:
            self._file.close()
        finally:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()




# --------------------------------------------------------------------------------------------
# Reading

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_REGULAR_TYPES = (b"0", b"\0", b"7")
_TYPE_NAMES = {b"1": "hard link", b"2": "symbolic link", b"3": "character device", b"4": "block device",
               b"5": "directory", b"6": "FIFO", b"S": "GNU sparse file", b"D": "GNU dump directory"}
_SIGNED_HEADER = struct.Struct("148b8x356b")


def _header_number(field: bytes) -> int:
    """A tar numeric field: octal digits (NUL/space padded), or GNU base-256 (high bit set)."""
    if field[:1] in (b"\x80", b"\xff"):
        value = int.from_bytes(field[1:], "big")
        return value - 256 ** (len(field) - 1) if field[0] == 0xFF else value
    digits = field.replace(b"\0", b" ").strip()
    return int(digits, 8) if digits else 0


class TarMemberReader:
    """The regular-file members of a tar stream, in order, read sequentially: ``next()`` gives
    ``(name, data)`` or None at the end of the archive.

    Why not :mod:`tarfile`: per member it builds a TarInfo, decodes every field and copies the
    data through a file object, which costs more than decompressing a small block; and it
    takes a header cut short for the end of the archive. Here a header is one 512-byte read
    and a few slices, the data one ``read(size)``. Handled: ustar/POSIX and GNU headers, pax
    extended headers (``x``: path and size; ``g`` is read and ignored), GNU long names (``L``,
    and ``K`` long link names, which are ignored), the ustar name prefix, and the end of the
    archive (a zero block, or the end of the stream at a member boundary). Any other member
    type (links, directories, devices, sparse files) is refused: a shard holds only files.

    Errors are :class:`ShardError` kind ``truncated`` (the stream ends inside a header or a
    member, or a header fails its checksum) or ``missing_field`` (a member that is not a
    regular file), naming the URL, the member and the byte offset. ``offset`` is the bytes
    read so far and ``count`` the members returned, which lets a caller tell an empty file
    (0 bytes) from an archive without members.
    """

    def __init__(self, fileobj: BinaryIO, url: str = ""):
        self._f = fileobj
        self.url = url
        self.offset = 0
        self.count = 0
        self.ended = False
        self._torn_at: Optional[int] = None  # the stream ended inside the last member's padding

    def _read(self, n: int) -> bytes:
        data = self._f.read(n)
        if 0 < len(data) < n:  # sockets and pipes may return less before the end: read on
            parts, got = [data], len(data)
            while got < n:
                more = self._f.read(n - got)
                if not more:
                    break
                parts.append(more)
                got += len(more)
            data = b"".join(parts)
        self.offset += len(data)
        return data

    def _error(self, message: str, kind: str = "truncated") -> ShardError:
        return ShardError(f"shard {self.url}: {message}; the file is truncated or damaged: {_REDO}",
                          kind=kind, url=self.url)

    def _data(self, size: int, start: int, name: str) -> bytes:
        data = self._read(size)
        if len(data) < size:
            raise self._error(f"the archive ends inside member #{self.count} {name!r} (header at byte {start}): "
                              f"{len(data)} of its {size} bytes are there")
        pad = -size % _BLOCK
        if pad and len(self._read(pad)) < pad:
            self._torn_at = self.offset  # the member is whole; the archive ends before its padding does
        return data

    def next(self) -> Optional[tuple[str, bytes]]:
        if self.ended:
            return None
        if self._torn_at is not None:
            raise self._error(f"the archive ends at byte {self._torn_at}, inside the padding after member "
                              f"#{self.count - 1}")
        long_name: Optional[bytes] = None
        pax: dict[bytes, bytes] = {}
        while True:
            start = self.offset
            header = self._read(_BLOCK)
            if len(header) < _BLOCK:
                if not header and long_name is None and not pax:
                    self.ended = True  # the end of the stream at a member boundary (no end blocks)
                    return None
                raise self._error(f"the archive ends inside the header of member #{self.count} "
                                  f"(bytes {start}..{self.offset} of a 512-byte header)")
            if header == _ZERO_BLOCK:
                if long_name is not None or pax:
                    raise self._error(f"an extended header at byte {start} is followed by the end of the archive")
                self.ended = True
                return None
            stored = header[148:156]
            try:
                checksum = _header_number(stored)
            except ValueError:
                checksum = -1
            computed = sum(header) - sum(stored) + 8 * 32
            if checksum != computed and checksum != sum(_SIGNED_HEADER.unpack(header)) + 8 * 32:
                raise self._error(f"the tar header at byte {start} (member #{self.count}) fails its checksum: "
                                  f"this is not a tar archive, or the header is damaged")
            try:
                size = _header_number(header[124:136])
            except ValueError:
                raise self._error(f"the tar header at byte {start} has an unreadable size field "
                                  f"{header[124:136]!r}") from None
            kind = header[156:157]
            if kind in (b"x", b"g", b"L", b"K"):
                data = self._data(size, start, f"<{kind.decode()} header>")
                if kind == b"x":
                    pax.update(self._pax_records(data, start))
                elif kind == b"L":
                    long_name = data.split(b"\0", 1)[0]
                continue
            name = self._name(header, long_name, pax)
            if kind not in _REGULAR_TYPES:
                what = _TYPE_NAMES.get(kind, f"member of type {kind!r}")
                raise ShardError(
                    f"shard {self.url}: member #{self.count} {name!r} (byte {start}) is a {what}; a shard holds "
                    f"only regular files, '{BLOCK_SUFFIX}' blocks: re-run `distlm prepare`",
                    kind="missing_field", url=self.url)
            if b"size" in pax:
                try:
                    size = int(pax[b"size"])
                except ValueError:
                    raise self._error(f"the pax header before byte {start} has a bad size {pax[b'size']!r}") from None
            if size < 0:
                raise self._error(f"the tar header at byte {start} has a negative size")
            data = self._data(size, start, name)
            self.count += 1
            return name, data

    @staticmethod
    def _name(header: bytes, long_name: Optional[bytes], pax: dict[bytes, bytes]) -> str:
        if b"path" in pax:
            raw = pax[b"path"]
        elif long_name is not None:
            raw = long_name
        else:
            raw = header[0:100].split(b"\0", 1)[0]
            if header[257:263] == b"ustar\0":  # POSIX ustar: a long name is split into prefix/name
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    raw = prefix + b"/" + raw
        return raw.decode("utf-8", "surrogateescape")

    def _pax_records(self, data: bytes, start: int) -> dict[bytes, bytes]:
        """``LEN key=value\\n`` records; LEN counts the whole record, digits and newline included."""
        out: dict[bytes, bytes] = {}
        pos = 0
        while pos < len(data) and data[pos:pos + 1] not in (b"\0", b""):
            space = data.find(b" ", pos)
            try:
                length = int(data[pos:space]) if space > pos else 0
            except ValueError:
                length = 0
            record = data[space + 1:pos + length] if length > 0 else b""
            if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
                raise self._error(f"the pax header at byte {start} has a malformed record at offset {pos}")
            key, _, value = record[:-1].partition(b"=")
            out[key] = value
            pos += length
        return out

    def close(self) -> None:
        self._f.close()


class ShardReader:
    """Forward-only access to the blocks of one shard (a local path or a URL).

    :meth:`read` returns block ``i`` decoded; :meth:`raw` returns its compressed bytes, so a
    caller can decide what to decompress (:meth:`decode` or :meth:`decode_into`). Members before
    the wanted one are passed over without being decompressed (``on_skip`` sees them). Asking
    for a block at or before the last one read reopens the file (for a URL: downloads again).

    Every fault is a :class:`ShardError` with its ``kind``, ``url`` (``location``) and
    ``block``. Given the manifest's ``block_rows``, a shard that ends early, even cleanly at a
    member boundary, is an error (``short``) and each block's row count is checked. After an
    error that is not block-local, asking again for that block or a later one raises the same
    error without reading the file again; earlier blocks can still be read.

    ``allow_pipe`` lets ``pipe:CMD`` locations run ``CMD`` (see :func:`distlm.data.remote.open_url`).
    """

    def __init__(self, location: str | os.PathLike, *, dtype: np.dtype | str, row_len: int,
                 block_rows: Optional[list[int]] = None, allow_pipe: bool = False):
        from .remote import local_path

        self.url = os.fspath(location)
        self.path: Optional[Path] = local_path(self.url)  # None for a remote shard
        self.dtype = np.dtype(dtype)
        self.row_len = row_len
        self.block_rows = block_rows
        self.allow_pipe = allow_pipe
        self._tar: Optional[TarMemberReader] = None
        self._next = 0  # index of the next block the open archive will give
        self._failed: Optional[ShardError] = None

    def _open_stream(self) -> BinaryIO:
        """The shard's bytes from the start (overridden by ``distlm data verify`` to hash them)."""
        if self.path is not None:
            try:
                return open(self.path, "rb")
            except FileNotFoundError as exc:
                raise ShardError(f"shard {self.url} does not exist; the dataset folder is incomplete: {_REDO}",
                                 kind="missing", url=self.url, block=0) from exc
            except OSError as exc:
                raise ShardError(f"cannot open shard {self.url} ({exc}); check the file and its permissions",
                                 kind="unreachable", url=self.url, block=0) from exc
        from .remote import open_url

        try:
            return open_url(self.url, allow_pipe=self.allow_pipe)
        except ShardError as exc:
            exc.block = 0
            raise

    def _open(self) -> None:
        self.close()
        try:
            self._tar = TarMemberReader(self._open_stream(), self.url)
        except ShardError as exc:
            self._poison(exc)
            raise
        self._next = 0

    def _poison(self, error: ShardError) -> ShardError:
        """Remember a fault that makes the rest of the shard unreadable; close the stream."""
        error.url = error.url or self.url
        if error.block is None:
            error.block = self._next
        self._failed = error
        self.close()
        return error

    def _expected_blocks(self) -> str:
        return f"{len(self.block_rows)}" if self.block_rows is not None else "more"

    def _next_member(self) -> Optional[tuple[int, bytes]]:
        """The next block of the open archive, checked to be block ``self._next``; None at the end."""
        tar = self._tar
        assert tar is not None
        try:
            got = tar.next()
        except ShardError as exc:
            self._poison(exc)
            raise
        except (OSError, EOFError, ValueError, http.client.HTTPException) as exc:  # network, IncompleteRead
            raise self._poison(ShardError(
                f"shard {self.url}: reading failed near block {self._next} ({type(exc).__name__}: {exc}); "
                f"if the file is remote, check the network and retry", kind="unreachable")) from exc
        if got is None:
            if tar.offset == 0:
                raise self._poison(ShardError(f"shard {self.url} is an empty file (0 bytes); {_REDO}",
                                              kind="empty", block=0))
            if tar.count == 0:
                raise self._poison(ShardError(
                    f"shard {self.url} is a valid tar archive with no members (zero samples), but the "
                    f"manifest lists {self._expected_blocks()} blocks; {_REDO}", kind="zero_samples", block=0))
            return None
        name, data = got
        match = _KEY_RE.match(name)
        if match is None:
            key = name.split(".", 1)[0]
            raise self._poison(ShardError(
                f"shard {self.url}: member #{tar.count - 1} is {name!r}, not '{block_member_name(self._next)}': "
                f"sample {key!r} lacks the '{BLOCK_SUFFIX}' field; this is not a distlm shard or it was "
                f"rewritten: {_REDO}", kind="missing_field"))
        index = int(match.group(1))
        if index < self._next:
            raise self._poison(ShardError(
                f"shard {self.url}: member #{tar.count - 1} {name!r} repeats key {index:08d} (expected "
                f"{block_member_name(self._next)} next); keys must increase 0, 1, 2, ...: {_REDO}",
                kind="duplicate_key"))
        if index > self._next:
            raise self._poison(ShardError(
                f"shard {self.url}: member {block_member_name(self._next)} is missing (found {name!r} in its "
                f"place); {_REDO}", kind="short"))
        self._next = index + 1
        return index, data

    def _short(self, block_index: int) -> ShardError:
        count = self._next
        return self._poison(ShardError(
            f"shard {self.url}: the archive ends cleanly after {count} blocks, but the manifest lists "
            f"{self._expected_blocks()}; block {block_index} ({block_member_name(block_index)}) is not there: "
            f"the file was cut at a member boundary (an interrupted copy?): {_REDO}", kind="short", block=count))

    def raw(self, block_index: int, on_skip: Optional[Callable[[int, bytes], None]] = None) -> bytes:
        """Compressed bytes of block ``block_index``; ``on_skip(i, data)`` gets members passed over."""
        if self.block_rows is not None and not 0 <= block_index < len(self.block_rows):
            raise IndexError(f"shard {self.url} has blocks 0..{len(self.block_rows) - 1}, not {block_index}")
        failed = self._failed
        if failed is not None and failed.block is not None and block_index >= failed.block:
            raise failed.copy()
        if self._tar is None or block_index < self._next:
            self._open()
        while True:
            got = self._next_member()
            if got is None:
                raise self._short(block_index)
            index, data = got
            if index == block_index:
                return data
            if on_skip is not None:
                on_skip(index, data)

    def _where(self, block_index: int) -> str:
        return f"shard {self.url} member {block_member_name(block_index)}"

    def _attach(self, error: ShardError, block_index: int) -> None:
        error.url = self.url
        error.block = block_index

    def decode(self, block_index: int, data: bytes) -> np.ndarray:
        """Decompress and check the bytes of block ``block_index`` of this shard."""
        expected = self.block_rows[block_index] if self.block_rows is not None else None
        try:
            return decode_block(data, dtype=self.dtype, row_len=self.row_len, where=self._where(block_index),
                                expected_rows=expected)
        except ShardError as exc:
            self._attach(exc, block_index)
            raise

    def decode_into(self, block_index: int, data: bytes, out: np.ndarray) -> None:
        """Decompress block ``block_index`` straight into ``out`` (``[rows, row_len]``, the stored
        dtype, C-contiguous), checking it as :func:`decode_block_into` does."""
        if self.block_rows is not None and out.shape != (self.block_rows[block_index], self.row_len):
            raise ValueError(f"block {block_index} of {self.url} is [{self.block_rows[block_index]}, {self.row_len}], "
                             f"the output array is {list(out.shape)}")
        try:
            decode_block_into(data, out, where=self._where(block_index))
        except ShardError as exc:
            self._attach(exc, block_index)
            raise

    def read(self, block_index: int) -> np.ndarray:
        return self.decode(block_index, self.raw(block_index))

    def expect_end(self) -> None:
        """Check that nothing but the end of the archive follows the last block read.

        Catches what reading the listed blocks cannot see: a repeated last member
        (``duplicate_key``) or members the manifest does not list (``row_count``).
        """
        if self._tar is None:
            return
        try:
            got = self._next_member()
        except ShardError as exc:
            if exc.kind == "short":  # a key jump after the listed blocks: still an unlisted member
                exc.kind = "row_count"
            raise
        if got is not None and self.block_rows is not None:
            raise self._poison(ShardError(
                f"shard {self.url}: the archive holds member {block_member_name(got[0])} after the "
                f"{len(self.block_rows)} blocks the manifest lists; {_REDO}", kind="row_count", block=got[0]))

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Every ``(block_index, rows)`` from the start of the file.

        Given ``block_rows``, exactly that many blocks must be there: fewer is ``short``, more
        is ``row_count``.
        """
        self._open()
        expected = len(self.block_rows) if self.block_rows is not None else None
        while True:
            if expected is not None and self._next == expected:
                self.expect_end()
                return
            wanted = self._next
            got = self._next_member()
            if got is None:
                if expected is not None:
                    raise self._short(wanted)
                return
            index, data = got
            yield index, self.decode(index, data)

    def close(self) -> None:
        if self._tar is not None:
            tar, self._tar = self._tar, None
            tar.close()

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_shard_blocks(
    path: str | os.PathLike, *, dtype: np.dtype | str, row_len: int, block_rows: Optional[list[int]] = None,
    allow_pipe: bool = False,
) -> Iterator[tuple[int, np.ndarray]]:
    """Every ``(block_index, rows)`` of a shard in order, decompressed and checked.

    Given the manifest's ``block_rows``, a shard cut off at a member boundary is caught too.
    """
    with ShardReader(path, dtype=dtype, row_len=row_len, block_rows=block_rows, allow_pipe=allow_pipe) as reader:
        yield from reader.blocks()


# --------------------------------------------------------------------------------------------
# Manifest


@dataclass
class SplitInfo(_KeyAccess):
    """One split: ``rows`` training rows of ``row_len`` tokens, taken from ``tokens`` tokens."""

    name: str
    rows: int
    tokens: int
    dropped_tokens: int
    shards: list[ShardInfo]
    stride: Optional[int] = None
    """Tokens between consecutive row starts; None for manifests that predate the field (seq_len)."""

    @property
    def blocks(self) -> int:
        return sum(len(s.block_rows) for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        out = {"rows": self.rows, "tokens": self.tokens, "dropped_tokens": self.dropped_tokens}
        if self.stride is not None:
            out["stride"] = self.stride
        out["shards"] = [s.to_dict() for s in self.shards]
        return out


@dataclass
class Manifest:
    """The parsed ``manifest.json`` of the dataset at ``location``.

    ``location`` is a local folder path or the URL of a dataset folder (``http(s)://host/ds``,
    or a ``pipe:`` command template with ``{}`` for the file name), without a trailing slash.
    Shards are found relative to it: :meth:`shard_url` works for both; :attr:`path` and
    :meth:`shard_path` only for local datasets.
    """

    location: str
    format: str
    version: int
    seq_len: int
    row_len: int
    dtype: str
    vocab_size: int
    tokenizer: dict[str, Any]
    tokenizer_file: str
    splits: dict[str, SplitInfo]
    source: dict[str, Any] = field(default_factory=dict)
    created: str = ""

    @property
    def is_remote(self) -> bool:
        from .remote import is_url

        return is_url(self.location)

    @property
    def path(self) -> Optional[Path]:
        """The dataset folder of a local dataset; None for one behind a URL."""
        return None if self.is_remote else Path(self.location)

    @property
    def manifest_url(self) -> str:
        from .remote import join_url

        return join_url(self.location, MANIFEST_NAME)

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype).newbyteorder("<")

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            hint = " (prepare with --val-fraction > 0 to get one)" if name == "val" else ""
            raise KeyError(
                f"dataset {self.location} has no split {name!r}{hint}; it has: {', '.join(sorted(self.splits))}"
            )
        return self.splits[name]

    def shard_url(self, shard: ShardInfo) -> str:
        """Where to read ``shard``: a path string for a local dataset, else a URL (for ShardReader)."""
        from .remote import join_url

        return join_url(self.location, shard.path)

    def shard_path(self, shard: ShardInfo) -> Path:
        """The file of ``shard`` of a local dataset (use :meth:`shard_url` for remote ones)."""
        if self.is_remote:
            raise ValueError(f"dataset {self.location} is remote: its shards have URLs (Manifest.shard_url), "
                             f"not local paths")
        return Path(self.location) / shard.path

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "version": self.version,
            "seq_len": self.seq_len,
            "row_len": self.row_len,
            "dtype": self.dtype,
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer,
            "tokenizer_file": self.tokenizer_file,
            "splits": {name: s.to_dict() for name, s in self.splits.items()},
            "source": self.source,
            "created": self.created,
        }


def write_manifest(out_dir: str | os.PathLike, manifest: dict[str, Any]) -> None:
    atomic_write_bytes(Path(out_dir) / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode("utf-8"))


def _need(d: dict[str, Any], key: str, where: str, redo: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f"{where}: missing key {key!r}; the manifest is damaged or incomplete: {redo}")
    return d[key]


# A shard path is a plain relative name: joined to a folder it must stay inside it, and put
# into a ``pipe:`` command template it must not be able to carry shell syntax.
_SHARD_PATH_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")


def load_manifest(location: str | os.PathLike, *, allow_pipe: bool = False) -> Manifest:
    """Parse and check the manifest of the dataset at ``location``; every error says which file
    and what to do.

    ``location``: a local folder, a ``file://`` URL of one, an ``http(s)://`` URL of one
    (``manifest.json`` is fetched from ``URL/manifest.json``), or, with ``allow_pipe``, a
    ``pipe:`` command template with ``{}`` for the file name (``pipe:aws s3 cp s3://b/ds/{} -``).
    A missing manifest is :class:`FileNotFoundError`; a server that cannot be reached is
    :class:`ShardError` kind ``unreachable``.
    """
    from .remote import join_url, local_path, open_url

    text = os.fspath(location)
    data_dir = local_path(text)
    if data_dir is not None:
        redo = f"run `distlm prepare ... --out {data_dir}` again"
        if not data_dir.is_dir():
            raise FileNotFoundError(
                f"dataset folder {data_dir} does not exist; run `distlm prepare ... --out {data_dir}` first"
            )
        mpath = data_dir / MANIFEST_NAME
        if not mpath.is_file():
            raise FileNotFoundError(
                f"{mpath} not found: {data_dir} is not a prepared dataset (or its prepare did not finish); "
                f"run `distlm prepare ... --out {data_dir}` first"
            )
        try:
            raw = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot parse {mpath} ({exc}); {redo}") from exc
        return _parse_manifest(raw, str(data_dir), str(mpath), redo)

    base = text if text.startswith("pipe:") else text.rstrip("/")
    murl = join_url(base, MANIFEST_NAME)
    redo = f"check the URL, or upload a dataset written by `distlm prepare` to {base}"
    try:
        with open_url(murl, allow_pipe=allow_pipe) as f:
            blob = f.read()
    except ShardError as exc:
        if exc.kind == "missing":
            raise FileNotFoundError(f"{murl} not found: {base} is not a prepared dataset; {redo}") from exc
        raise
    except (OSError, http.client.HTTPException) as exc:
        raise ShardError(f"{murl}: reading failed ({type(exc).__name__}: {exc}); check the network and retry",
                         kind="unreachable", url=murl) from exc
    try:
        raw = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse {murl} ({exc}); {redo}") from exc
    return _parse_manifest(raw, base, murl, redo)


def _parse_manifest(raw: Any, location: str, where: str, redo: str) -> Manifest:
    fmt = _need(raw, "format", where, redo)
    if fmt != FORMAT:
        raise ValueError(f"{where}: format is {fmt!r}, expected {FORMAT!r}; this is not a distlm dataset")
    version = _need(raw, "version", where, redo)
    if version != VERSION:
        raise ValueError(
            f"{where}: manifest version {version!r} is not supported (this distlm reads version "
            f"{VERSION}); {redo} with this version of distlm"
        )
    seq_len = int(_need(raw, "seq_len", where, redo))
    row_len = int(_need(raw, "row_len", where, redo))
    if row_len != seq_len + 1:
        raise ValueError(f"{where}: row_len {row_len} != seq_len + 1 = {seq_len + 1}; {redo}")
    dtype = _need(raw, "dtype", where, redo)
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"{where}: dtype {dtype!r} is not uint16 or uint32; {redo}")
    splits: dict[str, SplitInfo] = {}
    for name, s in _need(raw, "splits", where, redo).items():
        swhere = f"{where} split {name!r}"
        shards = []
        for i, sh in enumerate(_need(s, "shards", swhere, redo)):
            shwhere = f"{swhere} shard #{i}"
            info = ShardInfo(
                path=str(_need(sh, "path", shwhere, redo)),
                rows=int(_need(sh, "rows", shwhere, redo)),
                block_rows=[int(r) for r in _need(sh, "block_rows", shwhere, redo)],
                bytes=int(_need(sh, "bytes", shwhere, redo)),
                sha256=str(_need(sh, "sha256", shwhere, redo)),
                tokens=int(sh["tokens"]) if isinstance(sh, dict) and sh.get("tokens") is not None else None,
            )
            if not _SHARD_PATH_RE.match(info.path):
                raise ValueError(f"{shwhere}: path {info.path!r} is not a plain relative file name inside the "
                                 f"dataset folder; {redo}")
            if sum(info.block_rows) != info.rows:
                raise ValueError(f"{shwhere}: block_rows sum to {sum(info.block_rows)}, not rows={info.rows}; {redo}")
            if any(r < 1 for r in info.block_rows):
                raise ValueError(f"{shwhere}: block_rows must all be >= 1; {redo}")
            if info.tokens is not None and info.tokens != info.rows * row_len:
                raise ValueError(f"{shwhere}: tokens={info.tokens} is not rows x row_len = {info.rows * row_len}; "
                                 f"{redo}")
            shards.append(info)
        split = SplitInfo(
            name=name,
            rows=int(_need(s, "rows", swhere, redo)),
            tokens=int(_need(s, "tokens", swhere, redo)),
            dropped_tokens=int(s.get("dropped_tokens", 0)),
            shards=shards,
            stride=s.get("stride"),
        )
        if sum(sh.rows for sh in shards) != split.rows:
            total = sum(sh.rows for sh in shards)
            raise ValueError(f"{swhere}: shard rows sum to {total}, not rows={split.rows}; {redo}")
        splits[name] = split
    return Manifest(
        location=location,
        format=fmt,
        version=version,
        seq_len=seq_len,
        row_len=row_len,
        dtype=dtype,
        vocab_size=int(_need(raw, "vocab_size", where, redo)),
        tokenizer=_need(raw, "tokenizer", where, redo),
        tokenizer_file=str(_need(raw, "tokenizer_file", where, redo)),
        splits=splits,
        source=raw.get("source", {}),
        created=str(raw.get("created", "")),
    )
