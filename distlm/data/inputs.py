"""Finding input files and reading documents from them, for ``prepare`` and ``tokenizer train``.

Inputs are text files, folders of them (walked recursively in sorted order) and JSONL files
(``.jsonl``, ``.jsonl.zst``; one JSON object per line, the text under ``text_field``; blank
lines are skipped). Every text file, or every JSONL record, is one document. Text files are read
in chunks, so one huge file never has to fit in memory.
"""

from __future__ import annotations

import codecs
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import zstandard as zstd

__all__ = ["InputError", "NotUtf8", "Piece", "find_input_files", "input_kind", "read_documents"]

READ_CHUNK = 2 << 20  # bounds memory: the char encoder briefly holds ~16 bytes per character
_SKIP_DIRS = {"__pycache__"}
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class InputError(ValueError):
    """An input cannot be read as documents; the message names the file (and line) and the fix."""




def input_kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".jsonl.zst"):
        return "jsonl.zst"
    if name.endswith(".jsonl"):
        return "jsonl"
    return "text"


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


class NotUtf8(Exception):
    def __init__(self, offset: int):
        super().__init__(offset)
        self.offset = offset


@dataclass
class Piece:
    """Part of a document: ``text``; ``end`` marks the document's last piece."""

    text: str
    end: bool
    nbytes: int


def _read_text_file(path: Path) -> Iterator[Piece]:
    """One document in chunks. Raises NotUtf8 at the first invalid byte sequence."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = 0
    # Binary mode: bytes reach the tokenizer exactly as stored (no newline translation).
    with open(path, "rb") as f:
        while True:
            chunk = f.read(READ_CHUNK)
            final = not chunk
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as exc:
                raise NotUtf8(offset + max(exc.start, 0)) from None
            offset += len(chunk)
            if final:
                yield Piece(text, True, 0)
                return
            if text:
                yield Piece(text, False, len(chunk))


def _zst_chunks(f, path: Path) -> Iterator[bytes]:
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


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    rest = b""
    for chunk in chunks:
        parts = (rest + chunk).split(b"\n")
        rest = parts.pop()
        yield from parts
    if rest:
        yield rest


def _read_jsonl(path: Path, kind: str, text_field: str) -> Iterator[Piece]:
    """One document per non-blank line; a bad line stops with its file and line number."""
    with open(path, "rb") as f:
        chunks = _zst_chunks(f, path) if kind == "jsonl.zst" else iter(lambda: f.read(READ_CHUNK), b"")
        for lineno, line in enumerate(_lines(chunks), start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as exc:
                raise InputError(f"{where}: line is not valid UTF-8 ({exc.reason}); fix or remove it") from None
            except json.JSONDecodeError as exc:
                raise InputError(
                    f"{where}: invalid JSON ({exc.msg}, column {exc.colno}); fix or remove the line"
                ) from None
            if not isinstance(record, dict):
                raise InputError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
            if text_field not in record:
                fields = ", ".join(sorted(map(str, record))[:10]) or "none"
                raise InputError(
                    f"{where}: no field {text_field!r} (fields: {fields}); pick the text field with --text-field"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise InputError(f"{where}: field {text_field!r} is {type(text).__name__}, expected a string")
            if _SURROGATE_RE.search(text):
                raise InputError(f"{where}: field {text_field!r} holds a lone UTF-16 surrogate escape; fix the line")
            yield Piece(text, True, len(line) + 1)


def read_documents(path: Path, text_field: str) -> Iterator[Piece]:
    kind = input_kind(path)
    if kind == "text":
        return _read_text_file(path)
    return _read_jsonl(path, kind, text_field)


