"""Tokenizers that turn text into integer ids: raw UTF-8 bytes, or the characters of a corpus.

Both reserve one id for end-of-document (EOS), the highest id, so ``vocab_size = eos_id + 1``.
``encode`` never adds EOS: ``distlm prepare`` appends it after each document itself.
``decode`` renders EOS as ``eos_text`` (empty by default), so ``decode(encode(s)) == s``.

Encoding is vectorised with numpy because ``prepare`` pushes whole corpora through it.
A tokenizer is saved as a small JSON spec (:meth:`to_dict`) next to the shards it produced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence, Union

import numpy as np

from distlm.fsutil import atomic_write_text

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "Tokenizer",
    "TOKENIZER_CHOICES",
    "load_tokenizer",
    "tokenizer_from_dict",
]

TOKENIZER_CHOICES = ("byte", "char")

IdsLike = Union[np.ndarray, Sequence[int]]


def _as_id_array(ids: IdsLike, vocab_size: int) -> np.ndarray:
    arr = np.asarray(ids)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        bad = arr[(arr < 0) | (arr >= vocab_size)][0]
        raise ValueError(f"token id {int(bad)} is outside the vocabulary (0..{vocab_size - 1})")
    return arr.astype(np.int64, copy=False)


def _split_at_eos(arr: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """The pieces of ``arr`` between EOS ids (EOS itself dropped)."""
    cuts = np.flatnonzero(arr == eos_id)
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(arr[start:cut])
        start = cut + 1
    pieces.append(arr[start:])
    return pieces


class ByteTokenizer:
    """Ids 0..255 are the bytes of the UTF-8 encoding; 256 is EOS. Needs no fitting."""

    name = "byte"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as uint32 (no EOS appended)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def decode(self, ids: IdsLike, *, eos_text: str = "") -> str:
        """Text of ``ids``; each EOS becomes ``eos_text``.

        Byte sequences that are not valid UTF-8 (a model can emit them) decode to U+FFFD
        rather than raising, so sampling never crashes on a half-finished character.
        """
        arr = _as_id_array(ids, self.vocab_size)
        pieces = _split_at_eos(arr, self.eos_id)
        return eos_text.join(p.astype(np.uint8).tobytes().decode("utf-8", errors="replace") for p in pieces)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "vocab_size": self.vocab_size, "eos_id": self.eos_id}

    def save(self, path: str | os.PathLike) -> None:
        _save_json(self.to_dict(), path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class CharTokenizer:
    """One id per character of the corpus, in code-point order (as nanoGPT's shakespeare_char).

    The vocabulary is fixed by :meth:`fit`; encoding a character outside it raises, because
    silently mapping it to something else would corrupt the data.
    """

    name = "char"

    def __init__(self, chars: Iterable[str]):
        chars = list(chars)
        if any(len(c) != 1 for c in chars):
            raise ValueError("CharTokenizer vocabulary entries must be single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer vocabulary has duplicate characters")
        self.chars: list[str] = sorted(chars)
        self.eos_id = len(self.chars)
        self.vocab_size = len(self.chars) + 1
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        # Code point -> id lookup table; -1 marks characters outside the vocabulary.
        self._table = np.full(int(codes.max()) + 1 if codes.size else 1, -1, dtype=np.int32)
        self._table[codes] = np.arange(len(codes), dtype=np.int32)
        self._id_to_char = np.array(self.chars + [""], dtype=object)

    @classmethod
    def fit(cls, texts: Iterable[str]) -> "CharTokenizer":
        """Vocabulary = sorted unique characters of all ``texts``."""
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        if not seen:
            raise ValueError("cannot fit a CharTokenizer on empty text: the corpus has no characters")
        return cls(seen)

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as uint32 (no EOS appended); raises ValueError on unknown characters."""
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"), dtype=np.uint32)
        inside = codes < self._table.size
        ids = self._table[np.where(inside, codes, 0)]
        unknown = (~inside) | (ids < 0)
        if unknown.any():
            bad = chr(int(codes[np.argmax(unknown)]))
            raise ValueError(
                f"character {bad!r} (U+{ord(bad):04X}) is not in the char tokenizer's vocabulary of "
                f"{len(self.chars)} characters; rebuild the tokenizer on a corpus that contains it "
                f"(run `distlm prepare --tokenizer char` over all the text you will encode)"
            )
        return ids.astype(np.uint32)

    def decode(self, ids: IdsLike, *, eos_text: str = "") -> str:
        """Text of ``ids``; each EOS becomes ``eos_text``."""
        arr = _as_id_array(ids, self.vocab_size)
        if eos_text:
            lookup = np.array(self.chars + [eos_text], dtype=object)
            return "".join(lookup[arr])
        return "".join(self._id_to_char[arr])

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "chars": "".join(self.chars),
        }

    def save(self, path: str | os.PathLike) -> None:
        _save_json(self.to_dict(), path)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CharTokenizer) and other.chars == self.chars

    def __repr__(self) -> str:
        return f"CharTokenizer({len(self.chars)} chars)"


Tokenizer = Union[ByteTokenizer, CharTokenizer]


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from :meth:`to_dict` output; checks sizes so a damaged spec is caught."""
    if not isinstance(d, dict) or "name" not in d:
        raise ValueError(f"not a tokenizer spec (expected a dict with a 'name' key): {d!r:.200}")
    name = d["name"]
    if name == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif name == "char":
        if not isinstance(d.get("chars"), str):
            raise ValueError("char tokenizer spec has no 'chars' string; re-save it with CharTokenizer.save")
        tok = CharTokenizer(d["chars"])
    else:
        raise ValueError(f"unknown tokenizer name {name!r} in spec; known: {', '.join(TOKENIZER_CHOICES)}")
    for key in ("vocab_size", "eos_id"):
        if key in d and d[key] != getattr(tok, key):
            raise ValueError(
                f"tokenizer spec says {key}={d[key]} but the rebuilt {name} tokenizer has "
                f"{getattr(tok, key)}; the spec is damaged or from another version"
            )
    return tok


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """A tokenizer from ``"byte"``, a JSON file written by ``save``, or a prepared data folder.

    ``"char"`` is not accepted here: a char vocabulary must be fitted on a corpus
    (``CharTokenizer.fit`` or ``distlm prepare --tokenizer char``) and then loaded from its file.
    """
    spec_str = os.fspath(spec)
    if spec_str == "byte":
        return ByteTokenizer()
    path = Path(spec_str)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"cannot read tokenizer file {path}: {exc}") from exc
        try:
            return tokenizer_from_dict(d)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
    if spec_str == "char":
        raise ValueError(
            "the 'char' tokenizer has to be fitted on a corpus first: use `distlm prepare "
            "--tokenizer char`, then load the tokenizer.json it writes (or CharTokenizer.fit)"
        )
    raise ValueError(
        f"unknown tokenizer {spec_str!r}: choose 'byte', 'char' (fitted by prepare), or a path to a "
        f"tokenizer.json written by Tokenizer.save"
    )


def _save_json(d: dict[str, Any], path: str | os.PathLike) -> None:
    """Write atomically so a crash never leaves a half-written tokenizer behind."""
    atomic_write_text(path, json.dumps(d, indent=1) + "\n")
