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
shard's ``path``, ``rows``, ``block_rows`` (rows per member, in order), ``bytes`` and ``sha256``.
Readers use the row counts to find a position without opening the shards before it.

Files are written atomically (``*.tmp``, fsync, rename) so a crash leaves either the old file
or the new one, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Optional

import numpy as np
import webdataset as wds
import zstandard as zstd

from distlm.fsutil import atomic_write_bytes, fsync_dir

__all__ = [
    "FORMAT",
    "VERSION",
    "MANIFEST_NAME",
    "TOKENIZER_NAME",
    "BLOCK_SUFFIX",
    "ShardError",
    "ShardInfo",
    "SplitInfo",
    "Manifest",
    "ShardWriter",
    "ShardReader",
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


class ShardError(RuntimeError):
    """A shard is missing, truncated or corrupt. The message names the file and what to do."""


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


def decode_block(
    data: bytes,
    *,
    dtype: np.dtype | str,
    row_len: int,
    where: str,
    expected_rows: Optional[int] = None,
) -> np.ndarray:
    """The ``[rows, row_len]`` array of one block; ``where`` names it ("shard.tar member") in errors.

    Raises :class:`ShardError` on a truncated or corrupt frame (checksum mismatch), a size that
    is not a whole number of rows, or (given ``expected_rows``) a row count the manifest disagrees with.
    """
    dtype = np.dtype(dtype).newbyteorder("<")
    row_bytes = row_len * dtype.itemsize
    redo = "the file is damaged; re-copy it or re-run `distlm prepare`"
    try:
        size = zstd.frame_content_size(data)
    except zstd.ZstdError as exc:
        raise ShardError(f"{where}: not a readable zstd frame ({exc}); {redo}") from exc
    if size < 0:
        raise ShardError(f"{where}: zstd frame does not record its size; {redo}")
    if expected_rows is not None and size != expected_rows * row_bytes:
        raise ShardError(
            f"{where}: block holds {size} bytes but the manifest expects {expected_rows} rows "
            f"x {row_len} x {dtype.itemsize} bytes = {expected_rows * row_bytes}; {redo}"
        )
    try:
        raw = zstd.ZstdDecompressor().decompress(data)
    except zstd.ZstdError as exc:
        raise ShardError(f"{where}: corrupt or truncated zstd frame ({exc}); {redo}") from exc
    if len(raw) != size or size % row_bytes:
        raise ShardError(f"{where}: {len(raw)} bytes is not a whole number of rows of {row_bytes} bytes; {redo}")
    return np.frombuffer(raw, dtype=dtype).reshape(-1, row_len)


def decode_block_into(data: bytes, out: np.ndarray, *, where: str) -> None:
    """Decompress one block straight into ``out``, a C-contiguous ``[rows, row_len]`` array of the
    stored dtype whose size the manifest gives. No intermediate buffer: the reader's window is
    filled in place. Raises :class:`ShardError` when the frame is corrupt (checksum), truncated,
    or holds another number of bytes than ``out``.
    """
    redo = "the file is damaged; re-copy it or re-run `distlm prepare`"
    if not out.flags.c_contiguous:
        raise ValueError("decode_block_into needs a C-contiguous output array")
    try:
        size = zstd.frame_content_size(data)
    except zstd.ZstdError as exc:
        raise ShardError(f"{where}: not a readable zstd frame ({exc}); {redo}") from exc
    if size != out.nbytes:
        raise ShardError(
            f"{where}: block holds {size} bytes but the manifest expects {out.shape[0]} rows x "
            f"{out.shape[1]} x {out.itemsize} bytes = {out.nbytes}; {redo}"
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
    except zstd.ZstdError as exc:
        raise ShardError(f"{where}: corrupt or truncated zstd frame ({exc}); {redo}") from exc
    if got != size:
        raise ShardError(f"{where}: zstd frame is truncated ({got} of {size} bytes); {redo}")


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "rows": self.rows,
            "block_rows": list(self.block_rows),
            "bytes": self.bytes,
            "sha256": self.sha256,
        }


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


class ShardReader:
    """Forward-only access to the blocks of one shard, read with webdataset's tar iterator.

    :meth:`read` returns block ``i`` decoded; :meth:`raw` returns its compressed bytes, so a
    caller can decide what to decompress. Members before the wanted one are passed over
    without being decompressed (``on_skip`` sees them). Asking for a block at or before the
    last one read reopens the file.
    """

    def __init__(self, path: str | os.PathLike, *, dtype: np.dtype | str, row_len: int,
                 block_rows: Optional[list[int]] = None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self.row_len = row_len
        self.block_rows = block_rows
        self._file: Optional[BinaryIO] = None
        self._members: Optional[Iterator[dict[str, Any]]] = None
        self._next = 0  # index of the next block the open iterator will give

    def _open(self) -> None:
        self.close()
        try:
            self._file = open(self.path, "rb")
        except OSError as exc:
            raise ShardError(
                f"cannot open shard {self.path}: {exc}; the dataset folder is incomplete, "
                f"re-copy it or re-run `distlm prepare`"
            ) from exc
        self._members = wds.tariterators.tar_file_iterator(self._file)
        self._next = 0

    def _next_member(self, wanted: int) -> Optional[tuple[int, bytes]]:
        assert self._members is not None
        try:
            member = next(self._members)
        except StopIteration:
            return None
        except Exception as exc:  # tarfile raises several types for a torn archive
            raise ShardError(
                f"shard {self.path}: cannot read the tar archive near block {wanted} ({exc}); "
                f"the file is truncated or damaged: re-copy it or re-run `distlm prepare`"
            ) from exc
        match = _KEY_RE.match(member["fname"])
        if match is None:
            raise ShardError(
                f"shard {self.path}: unexpected member {member['fname']!r} (expected "
                f"'NNNNNNNN.{BLOCK_SUFFIX}'); this is not a distlm shard, re-run `distlm prepare`"
            )
        return int(match.group(1)), member["data"]

    def raw(self, block_index: int, on_skip: Optional[Callable[[int, bytes], None]] = None) -> bytes:
        """Compressed bytes of block ``block_index``; ``on_skip(i, data)`` gets members passed over."""
        if self._members is None or block_index < self._next:
            self._open()
        while True:
            got = self._next_member(block_index)
            if got is None:
                raise ShardError(
                    f"shard {self.path}: archive ends before block {block_index} "
                    f"(member {block_member_name(block_index)}); the file is truncated: "
                    f"re-copy it or re-run `distlm prepare`"
                )
            index, data = got
            self._next = index + 1
            if index == block_index:
                return data
            if index > block_index:
                raise ShardError(
                    f"shard {self.path}: member {block_member_name(block_index)} is missing "
                    f"(found {block_member_name(index)} instead); re-run `distlm prepare`"
                )
            if on_skip is not None:
                on_skip(index, data)

    def decode(self, block_index: int, data: bytes) -> np.ndarray:
        """Decompress and check the bytes of block ``block_index`` of this shard."""
        expected = self.block_rows[block_index] if self.block_rows is not None else None
        return decode_block(
            data,
            dtype=self.dtype,
            row_len=self.row_len,
            where=f"shard {self.path} member {block_member_name(block_index)}",
            expected_rows=expected,
        )

    def read(self, block_index: int) -> np.ndarray:
        return self.decode(block_index, self.raw(block_index))

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """Every ``(block_index, rows)`` from the start of the file, whatever the indices are."""
        self._open()
        while (got := self._next_member(self._next)) is not None:
            index, data = got
            self._next = index + 1
            yield index, self.decode(index, data)

    def close(self) -> None:
        self._members = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "ShardReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def iter_shard_blocks(
    path: str | os.PathLike, *, dtype: np.dtype | str, row_len: int, block_rows: Optional[list[int]] = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Every ``(block_index, rows)`` of a shard in order, decompressed and checked.

    Given the manifest's ``block_rows``, a shard cut off at a member boundary is caught too.
    """
    with ShardReader(path, dtype=dtype, row_len=row_len, block_rows=block_rows) as reader:
        if block_rows is not None:
            for i in range(len(block_rows)):
                yield i, reader.read(i)
        else:
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
    """The parsed ``manifest.json`` of a dataset folder ``path``."""

    path: Path
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
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype).newbyteorder("<")

    def split(self, name: str) -> SplitInfo:
        if name not in self.splits:
            hint = " (prepare with --val-fraction > 0 to get one)" if name == "val" else ""
            raise KeyError(
                f"dataset {self.path} has no split {name!r}{hint}; it has: {', '.join(sorted(self.splits))}"
            )
        return self.splits[name]

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.path / shard.path

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


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    """Parse and check ``DIR/manifest.json``; every error says which file and what to do."""
    data_dir = Path(data_dir)
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
    where = str(mpath)
    fmt = _need(raw, "format", where, redo)
    if fmt != FORMAT:
        raise ValueError(f"{mpath}: format is {fmt!r}, expected {FORMAT!r}; this is not a distlm dataset")
    version = _need(raw, "version", where, redo)
    if version != VERSION:
        raise ValueError(
            f"{mpath}: manifest version {version!r} is not supported (this distlm reads version "
            f"{VERSION}); {redo} with this version of distlm"
        )
    seq_len = int(_need(raw, "seq_len", where, redo))
    row_len = int(_need(raw, "row_len", where, redo))
    if row_len != seq_len + 1:
        raise ValueError(f"{mpath}: row_len {row_len} != seq_len + 1 = {seq_len + 1}; {redo}")
    dtype = _need(raw, "dtype", where, redo)
    if dtype not in ("uint16", "uint32"):
        raise ValueError(f"{mpath}: dtype {dtype!r} is not uint16 or uint32; {redo}")
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
            )
            if sum(info.block_rows) != info.rows:
                raise ValueError(f"{shwhere}: block_rows sum to {sum(info.block_rows)}, not rows={info.rows}; {redo}")
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
        path=data_dir,
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
