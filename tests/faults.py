"""Fault injection for shard files: each function damages one ``.tar`` shard in place, the way
files get damaged in practice (an interrupted copy, a lost file, bit rot, a tool that rewrote
the archive). Shared by the tests of the reader, ``distlm data verify`` and the training stream.

``member`` counts tar members from 0 (member ``i`` of a distlm shard is block ``i``). The
rewriting faults write a *valid* tar (standard tools still read it), so only the content is
wrong, not the archive structure.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path
from typing import Union

PathLike = Union[str, os.PathLike]


def members(path: PathLike) -> list[tarfile.TarInfo]:
    """The members of a (still valid) tar, with ``offset`` (header) and ``offset_data``."""
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _contents(path: PathLike) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def _rewrite(path: PathLike, items: list[tuple[str, bytes]]) -> None:
    """Write ``items`` as a fresh tar, with the headers webdataset's TarWriter would write."""
    with tarfile.open(path, "w") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            info.uname = info.gname = "bigdata"
            tar.addfile(info, io.BytesIO(data))


def _truncate(path: PathLike, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


def cut_mid_member(path: PathLike, member: int = 0) -> int:
    """Cut the file in the middle of ``member``'s data (an interrupted copy); returns the new size."""
    m = members(path)[member]
    size = m.offset_data + m.size // 2
    _truncate(path, size)
    return size


def cut_in_header(path: PathLike, member: int = 1) -> int:
    """Cut the file inside ``member``'s 512-byte header, which tarfile takes for a clean end."""
    size = members(path)[member].offset + 100
    _truncate(path, size)
    return size


def cut_at_member_boundary(path: PathLike, keep_members: int) -> int:
    """Keep the first ``keep_members`` members whole and cut right after them (no end blocks)."""
    ms = members(path)
    size = ms[keep_members].offset if keep_members < len(ms) else ms[-1].offset_data + -(-ms[-1].size // 512) * 512
    _truncate(path, size)
    return size


def make_empty(path: PathLike) -> None:
    """A 0-byte file, as left by a copy that created the file and died."""
    Path(path).write_bytes(b"")


def remove(path: PathLike) -> None:
    Path(path).unlink()


def zero_samples(path: PathLike) -> None:
    """A valid tar archive without members."""
    _rewrite(path, [])


def missing_field(path: PathLike, member: int, suffix: str = "txt") -> str:
    """Rename ``member``'s field (``00000001.tokens.zst`` -> ``00000001.txt``): the sample keeps
    its key but lacks the ``tokens.zst`` field. Returns the new name."""
    items = _contents(path)
    name, data = items[member]
    new = f"{name.split('.', 1)[0]}.{suffix}"
    items[member] = (new, data)
    _rewrite(path, items)
    return new


def duplicate_key(path: PathLike, member: int) -> None:
    """``member`` appears twice in a row (a writer retried a sample after an error)."""
    items = _contents(path)
    items.insert(member + 1, items[member])
    _rewrite(path, items)


def truncate_frame(path: PathLike, member: int) -> None:
    """Replace ``member``'s zstd frame with its first half, in a valid tar (its header's size
    says the shorter length), so only the frame itself tells."""
    items = _contents(path)
    name, data = items[member]
    items[member] = (name, data[: len(data) // 2])
    _rewrite(path, items)


def flip_bit(path: PathLike, member: int, bit: int = 4) -> int:
    """Flip one bit in the middle of ``member``'s zstd frame, in place (bit rot): the tar is
    untouched. Returns the byte offset flipped."""
    m = members(path)[member]
    offset = m.offset_data + m.size // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ (1 << bit)]))
    return offset
