"""Finding input files and reading documents from them, for ``prepare`` and ``tokenizer train``.

Inputs are text files, folders of them (walked recursively in sorted order) and JSONL files
(``.jsonl``, ``.jsonl.zst``, ``.jsonl.gz``; one JSON object per line, the text under
``text_field``; blank lines are skipped). Any other ``.gz`` file is a gzipped text file. Every
text file, or every JSONL record, is one document.

A file is read as a sequence of :class:`Segment` s of raw (decompressed) bytes, so one huge
file never has to fit in memory and the bytes can be decoded elsewhere (``prepare`` parses
JSON and tokenizes in worker processes): a JSONL segment holds whole lines, a text segment a
piece of the document cut after a newline (or, in a 2 MiB stretch without one, at a character
boundary). Text pieces always start at the same offsets, so reading can resume at any segment.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, Optional, Sequence, Union

import zstandard as zstd

__all__ = [
    "InputError",
    "NotUtf8",
    "Piece",
    "Segment",
    "find_input_files",
    "input_kind",
    "iter_segments",
    "read_documents",
    "segment_documents",
]

READ_CHUNK = 2 << 20
"""Size of a text piece (and the default of a JSONL segment): bounds memory, and the char
encoder briefly holds ~16 bytes per character."""
_SKIP_DIRS = {"__pycache__"}
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class InputError(ValueError):
    """An input cannot be read as documents; the message names the file (and line) and the fix."""


class NotUtf8(Exception):
    """A text file is not valid UTF-8 at byte ``offset``: callers skip the file (binary, most likely)."""

    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


def input_kind(path: Path) -> str:
    """``text``, ``text.gz``, ``jsonl``, ``jsonl.gz`` or ``jsonl.zst``, from the file name."""
    name = path.name.lower()
    for kind in ("jsonl.zst", "jsonl.gz", "jsonl"):
        if name.endswith("." + kind):
            return kind
    return "text.gz" if name.endswith(".gz") else "text"


def find_input_files(inputs: Sequence[Union[str, os.PathLike]], exclude: Optional[Path] = None) -> list[Path]:
    """Files named by ``inputs``, folders expanded recursively in sorted order.

    Entries of a folder are taken in name order, descending into sub-folders where they sort
    (``a/1.txt``, ``a/2.txt``, ``b.txt``), so the order is the same on every filesystem.
    Hidden entries and ``__pycache__`` are skipped inside folders (a file named explicitly is
    always taken). ``exclude`` (the output folder) is never walked, so preparing into a folder
    under an input does not read its own shards.
    """
    exclude = exclude.resolve() if exclude is not None else None
    files: list[Path] = []

    def walk(folder: Path) -> None:
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.name.startswith(".") or entry.name in _SKIP_DIRS:
                continue
            path = folder / entry.name
            if entry.is_dir():
                if exclude is None or path.resolve() != exclude:
                    walk(path)
            elif entry.is_file():
                files.append(path)

    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise InputError(f"input {path} does not exist; check the path (inputs are files or folders)")
        if path.is_dir():
            walk(path)
        else:
            files.append(path)
    return files


# --------------------------------------------------------------------------------------------
# Decompressed bytes


def _zst_chunks(f: BinaryIO, path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-frame) zstd file; a cut-off frame is an error."""
    dctx = zstd.ZstdDecompressor()
    obj, fed = dctx.decompressobj(), False
    try:
        while chunk := f.read(1 << 20):
            data = chunk
            while data:
                out = obj.decompress(data)
                fed = True
                if out:
                    yield out
                if obj.eof:
                    data = obj.unused_data
                    obj, fed = dctx.decompressobj(), False
                else:
                    data = b""
    except zstd.ZstdError as exc:
        raise InputError(f"{path}: corrupt zstd data ({exc}); re-create or re-download the file") from exc
    if fed and not obj.eof:
        raise InputError(f"{path}: the zstd stream is truncated; re-create or re-download the file")


def _gz_chunks(f: BinaryIO, path: Path) -> Iterator[bytes]:
    """Decompressed bytes of a (possibly multi-member) gzip file, at most 4 MiB at a time (a
    small compressed chunk can hold a lot of text); a cut-off member is an error."""
    limit = 4 << 20
    obj, fed = zlib.decompressobj(wbits=31), False
    try:
        while chunk := f.read(1 << 20):
            data = chunk
            while True:
                out = obj.decompress(data, limit)
                fed = True
                if out:
                    yield out
                if obj.eof:
                    data = obj.unused_data
                    obj, fed = zlib.decompressobj(wbits=31), False
                else:
                    data = obj.unconsumed_tail
                # A full `out` may leave output pending inside zlib: ask again even without input.
                if not data and (obj.eof or len(out) < limit):
                    break
    except zlib.error as exc:
        raise InputError(f"{path}: corrupt gzip data ({exc}); re-create or re-download the file") from exc
    if fed and not obj.eof:
        raise InputError(f"{path}: the gzip stream is truncated; re-create or re-download the file")


class _Reader:
    """``read(n)`` over an iterator of byte chunks; ``read`` returns less than ``n`` only at the end."""

    def __init__(self, chunks: Iterator[bytes]):
        self._chunks = chunks
        self._buf = bytearray()

    def read(self, n: int) -> bytes:
        while len(self._buf) < n and (chunk := next(self._chunks, None)) is not None:
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def skip(self, n: int) -> None:
        while n > 0 and (got := len(self.read(min(n, READ_CHUNK)))):
            n -= got


def _open_reader(f: BinaryIO, path: Path, offset: int) -> _Reader:
    """The decompressed bytes of ``path`` (open as ``f``) from ``offset``: a seek for a plain
    file, decompress-and-discard for a compressed one."""
    kind = input_kind(path)
    if kind.endswith(".zst"):
        reader = _Reader(_zst_chunks(f, path))
    elif kind.endswith(".gz"):
        reader = _Reader(_gz_chunks(f, path))
    else:
        f.seek(offset)
        return _Reader(iter(lambda: f.read(READ_CHUNK), b""))
    reader.skip(offset)
    return reader


# --------------------------------------------------------------------------------------------
# Segments


@dataclass
class Segment:
    """Raw bytes of one input file, at ``offset`` of its decompressed bytes.

    ``kind`` is "text" (``data`` is a piece of the file's one document; ``end`` marks the last
    piece) or "jsonl" (``data`` holds whole lines, the first being line ``lineno``). ``last``
    marks the file's last segment.
    """

    path: str
    kind: str
    offset: int
    lineno: int
    data: bytes
    end: bool
    last: bool = False

    def next_position(self) -> tuple[int, int]:
        """(offset, lineno) where the file's next segment starts."""
        return self.offset + len(self.data), self.lineno + self.data.count(b"\n")


_SPACE = b" \t\r\n\x0b\x0c"


def _cut(window: bytes, limit: int) -> int:
    """Length of the next text piece of a long text file, at most ``limit`` bytes.

    Pieces are tokenized separately, so a cut must fall where tokenizers split anyway: after a
    newline that is followed by a non-space (so runs of blank lines and indentation stay whole),
    else before a space that follows a non-space (byte-level BPE keeps a space with the word
    after it), else at any newline, else at a character boundary (so each piece decodes on its
    own). The cuts depend only on the bytes, never on batch sizes or worker counts.
    """
    floor = limit // 2  # look back at most this far for a good cut
    i = window.rfind(b"\n", floor, limit)
    while i >= floor:
        if window[i + 1] not in _SPACE:
            return i + 1
        i = window.rfind(b"\n", floor, i)
    i = window.rfind(b" ", floor, limit)
    while i > floor:
        if window[i - 1] not in _SPACE:
            return i
        i = window.rfind(b" ", floor, i)
    newline = window.rfind(b"\n", 0, limit)
    if newline >= 0:
        return newline + 1
    cut = limit
    while cut > limit - 3 and (window[cut] & 0xC0) == 0x80:  # a UTF-8 continuation byte
        cut -= 1
    return cut


def _text_segments(reader: _Reader, path: str, offset: int) -> Iterator[Segment]:
    carry = b""
    while True:
        window = carry + reader.read(READ_CHUNK + 1 - len(carry))
        if len(window) <= READ_CHUNK:
            yield Segment(path, "text", offset, 1, window, end=True)
            return
        cut = _cut(window, READ_CHUNK)
        yield Segment(path, "text", offset, 1, window[:cut], end=False)
        offset += cut
        carry = window[cut:]


def _jsonl_segments(reader: _Reader, path: str, offset: int, lineno: int, chunk: int) -> Iterator[Segment]:
    carry = b""
    while True:
        data = reader.read(chunk)
        if not data:
            if carry:  # a last line without a newline
                yield Segment(path, "jsonl", offset, lineno, carry, end=True)
            return
        buf = carry + data
        newline = buf.rfind(b"\n")
        if newline < 0:
            carry = buf
            continue
        seg = Segment(path, "jsonl", offset, lineno, buf[:newline + 1], end=True)
        yield seg
        offset, lineno = seg.next_position()
        carry = buf[newline + 1:]


def _mark_last(segments: Iterator[Segment]) -> Iterator[Segment]:
    """Sets ``last`` on the final segment (one segment of look-ahead)."""
    prev = next(segments, None)
    for seg in segments:
        yield prev
        prev = seg
    if prev is not None:
        prev.last = True
        yield prev


def _check_utf8(seg: Segment) -> None:
    try:
        seg.data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise NotUtf8(seg.offset + exc.start) from None


def _raw_segments(path: Path, offset: int, lineno: int, jsonl_chunk: int) -> Iterator[Segment]:
    with open(path, "rb") as f:
        reader = _open_reader(f, path, offset)
        if input_kind(path).startswith("jsonl"):
            yield from _jsonl_segments(reader, str(path), offset, lineno, jsonl_chunk)
        else:
            yield from _text_segments(reader, str(path), offset)


def iter_segments(path: Path, offset: int = 0, lineno: int = 1, jsonl_chunk: int = READ_CHUNK) -> Iterator[Segment]:
    """The segments of ``path`` from ``offset`` (with ``lineno``, a position a segment started at).

    A text file read from its start is checked to be UTF-8 before its first piece is given
    (raising :class:`NotUtf8`), by a first read of the whole file if it is longer than one
    piece: a file is then either skipped whole or read whole. ``jsonl_chunk`` is the size of a
    JSONL segment (about; whole lines); text pieces are always :data:`READ_CHUNK`.
    Raises :class:`InputError` for corrupt or truncated compressed data.
    """
    segments = _mark_last(_raw_segments(path, offset, lineno, jsonl_chunk))
    if offset == 0 and not input_kind(path).startswith("jsonl"):
        first = next(segments)
        for seg in [first] if first.end else _raw_segments(path, 0, 1, jsonl_chunk):
            _check_utf8(seg)
        yield first
    yield from segments


# --------------------------------------------------------------------------------------------
# Documents


@dataclass
class Piece:
    """Part of a document: ``text``; ``end`` marks the document's last piece, ``start`` its first."""

    text: str
    end: bool
    nbytes: int
    start: bool = True


def _parse_jsonl_line(line: bytes, where: str, text_field: str) -> str:
    """The text of one JSONL record; every problem names ``where`` (file:line) and the fix."""
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(f"{where}: line is not valid UTF-8 ({exc.reason}); fix or remove it") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: invalid JSON ({exc.msg}, column {exc.colno}); fix or remove the line") from None
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if text_field not in record:
        fields = ", ".join(sorted(map(str, record))[:10]) or "none"
        raise InputError(f"{where}: no field {text_field!r} (fields: {fields}); pick the text field with --text-field")
    text = record[text_field]
    if not isinstance(text, str):
        raise InputError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
    # Only a \uD800-\uDFFF escape can put a surrogate in the text (UTF-8 bytes cannot): look
    # for one only when the raw line has such an escape, which is rare and much cheaper to test.
    if (b"\\ud" in line or b"\\uD" in line) and _SURROGATE_RE.search(text):
        raise InputError(f"{where}: field {text_field!r} holds a lone UTF-16 surrogate escape; fix the line")
    return text


def segment_documents(seg: Segment, text_field: str) -> Iterator[Piece]:
    """The document pieces of a segment: one per non-blank JSONL line, or the decoded text piece.

    Raises :class:`InputError` naming file:line for a bad JSONL line and :class:`NotUtf8` for
    text that does not decode.
    """
    if seg.kind == "text":
        _check_utf8(seg)
        yield Piece(seg.data.decode("utf-8"), seg.end, len(seg.data), start=seg.offset == 0)
        return
    for i, line in enumerate(seg.data.split(b"\n")):
        if line.strip():
            yield Piece(_parse_jsonl_line(line, f"{seg.path}:{seg.lineno + i}", text_field), True, len(line) + 1)


def read_documents(path: Path, text_field: str) -> Iterator[Piece]:
    """Every document piece of ``path`` in order (see :func:`iter_segments` for the errors)."""
    for seg in iter_segments(path):
        yield from segment_documents(seg, text_field)
