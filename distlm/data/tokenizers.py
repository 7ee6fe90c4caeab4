"""Tokenizers that turn text into integer ids.

Four kinds, one interface (``name``, ``vocab_size``, ``eos_id``, ``bos_id``, ``pad_id``,
``mask_id``, ``encode``, ``encode_batch``, ``decode``, ``to_dict``, ``save``):

* ``byte``: raw UTF-8 bytes (ids 0..255), EOS = 256. Needs no fitting.
* ``char``: the characters of a corpus, EOS = the highest id (fitted by ``distlm prepare``).
* ``hf``: any Hugging Face ``tokenizers`` tokenizer.json, e.g. one written by
  ``distlm tokenizer train`` (byte-level BPE, see :mod:`distlm.data.tokenizer_train`).
* ``sentencepiece``: a SentencePiece ``.model``.

``encode`` never adds BOS or EOS: ``distlm prepare`` appends EOS after each document itself, and
documents are recovered later from the EOS ids (attention masking). So a special token's *text*
inside a document (``"<|endoftext|>"`` in a web page) is encoded as ordinary text, never as the
special id: an EOS id in a prepared stream always marks a real document boundary.
``decode`` renders EOS as ``eos_text`` (empty by default) and drops BOS/PAD/MASK ids, so
``decode(encode(s)) == s`` wherever the tokenizer is lossless (byte, char, byte-level BPE,
SentencePiece models trained without normalization and with byte fallback).

``save`` writes one file that :func:`load_tokenizer` reads back: byte and char as a small JSON
spec (:meth:`to_dict`); ``hf`` as the HF tokenizer.json itself (so HF tools read it too, and the
special ids are re-derived from its special tokens on load); ``sentencepiece`` as a distlm JSON
that embeds the model (base64), so a dataset folder is self-contained. Nothing is ever
downloaded: every tokenizer comes from a local file.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from distlm.fsutil import atomic_write_text

__all__ = [
    "ByteTokenizer",
    "CharTokenizer",
    "HFTokenizer",
    "SentencePieceTokenizer",
    "SPECIAL_TOKEN_NAMES",
    "Tokenizer",
    "TOKENIZER_CHOICES",
    "TOKENIZER_KINDS",
    "load_tokenizer",
    "tokenizer_from_dict",
]

TOKENIZER_CHOICES = ("byte", "char")
"""Tokenizers named by a word; the others are loaded from a file."""
TOKENIZER_KINDS = ("byte", "char", "hf", "sentencepiece")
"""Every ``name`` a tokenizer can have."""

SPECIAL_TOKEN_NAMES: dict[str, tuple[str, ...]] = {
    "eos": ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|eos|>", "[EOS]"),
    "bos": ("<|bos|>", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]"),
    "pad": ("<|pad|>", "<pad>", "[PAD]", "<|padding|>"),
    "mask": ("<|mask|>", "<mask>", "[MASK]"),
}
"""Token strings recognised as each special role in loaded HF / SentencePiece tokenizers, in
order of preference. Tokenizer files carry no standard "this is EOS" field, so the role is
recognised by the conventional names (GPT-2, Llama, T5, BERT, ...)."""

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
    bos_id: Optional[int] = None
    pad_id: Optional[int] = None
    mask_id: Optional[int] = None

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as uint32 (no EOS appended)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

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
    bos_id: Optional[int] = None
    pad_id: Optional[int] = None
    mask_id: Optional[int] = None

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

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

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


# --------------------------------------------------------------------------------------------
# File-based tokenizers: Hugging Face tokenizers and SentencePiece


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _find_special_ids(
    lookups: Sequence[Callable[[str, str], Optional[int]]], token_of: Callable[[int], str], source: str, fix: str
) -> tuple[dict[str, Optional[int]], dict[str, Optional[str]]]:
    """(role -> id, role -> token string) for eos/bos/pad/mask; raises if there is no EOS.

    ``lookups(role, candidate_name)`` are tried in order (e.g. "marked special" before "anywhere
    in the vocabulary"), each over the names of :data:`SPECIAL_TOKEN_NAMES` in order of preference.
    """
    ids: dict[str, Optional[int]] = {}
    names: dict[str, Optional[str]] = {}
    for role, candidates in SPECIAL_TOKEN_NAMES.items():
        found = next((i for lookup in lookups for cand in candidates if (i := lookup(role, cand)) is not None), None)
        ids[role] = found
        names[role] = None if found is None else token_of(found)
    if ids["eos"] is None:
        looked = ", ".join(repr(c) for c in SPECIAL_TOKEN_NAMES["eos"])
        raise ValueError(
            f"{source}: no end-of-document (EOS) token found; looked for {looked}. distlm appends "
            f"EOS after every document, so the tokenizer needs one: {fix}"
        )
    return ids, names


def _drop_reachable_specials(encode: Callable[[str], list[int]], ids: dict[str, Optional[int]],
                             names: dict[str, Optional[str]], source: str, fix: str) -> None:
    """Make sure no special id can come out of plain text; edits ``ids``/``names`` in place.

    If EOS could (the text "<|endoftext|>" encoding to the EOS id), a document that merely
    contains that text would look like two once prepared, since EOS ids are the document
    boundaries used for attention masking: such a tokenizer is refused. A BOS/PAD/MASK token
    that text can produce is an ordinary token, so that role is left unset (None) instead.
    """
    for role in ("eos", "bos", "pad", "mask"):
        text = names[role]
        if text is None:
            continue
        special = {i for i in ids.values() if i is not None}
        hit = special.intersection(encode(text))
        if not hit:
            continue
        if role == "eos" or ids["eos"] in hit:
            raise ValueError(
                f"{source}: the plain text {text!r} encodes to the special id {min(hit)}, so a document "
                f"containing that text would be split at a fake document boundary; {fix}"
            )
        ids[role] = names[role] = None


def _decode_pieces(arr: np.ndarray, eos_id: int, drop: set[int], eos_text: str,
                   decode: Callable[[list[int]], str]) -> str:
    pieces = _split_at_eos(arr, eos_id)
    if drop:
        drop_arr = np.fromiter(drop, dtype=np.int64)
        pieces = [p[~np.isin(p, drop_arr)] for p in pieces]
    return eos_text.join(decode(p.tolist()) for p in pieces)


class HFTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (any tokenizer.json), e.g. a trained byte-level BPE.

    Special ids are found by name (:data:`SPECIAL_TOKEN_NAMES`), preferring tokens the file marks
    ``special``. Encoding sets ``encode_special_tokens`` so special-token text in a document is
    split like any other text, and passes ``add_special_tokens=False`` so a post-processor
    (e.g. Llama's BOS template) never adds ids: ``distlm prepare`` places EOS itself.
    """

    name = "hf"
    _FIX = ("add one as a special token (tokenizers: `tok.add_special_tokens(['<|endoftext|>'])`, "
            "then `tok.save(path)`), or train a tokenizer with `distlm tokenizer train`")

    def __init__(self, tokenizer: Any, *, source: str = "<in-memory HF tokenizer>"):
        self._tk = tokenizer
        self.source = source
        # Not stored in tokenizer.json (HF defaults it to False on load), so set it on every load.
        tokenizer.encode_special_tokens = True
        self._json = tokenizer.to_str(pretty=True)
        self.sha256 = _sha256(self._json.encode("utf-8"))
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        # Ids may have gaps (added tokens placed beyond the model's vocabulary): size covers all.
        self.vocab_size = max(tokenizer.get_vocab_size(with_added_tokens=True), max(vocab.values(), default=-1) + 1)
        marked = {t.content: i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special}
        ids, names = _find_special_ids([lambda role, cand: marked.get(cand), lambda role, cand: vocab.get(cand)],
                                       tokenizer.id_to_token, source, self._FIX)
        _drop_reachable_specials(lambda t: tokenizer.encode(t, add_special_tokens=False).ids,
                                      ids, names, source,
                                      "mark the token special in the tokenizer.json (\"special\": true)")
        _set_special_ids(self, ids, names)

    @classmethod
    def from_json_str(cls, text: str, *, source: str = "<in-memory HF tokenizer>") -> "HFTokenizer":
        from tokenizers import Tokenizer as _HF

        try:
            tk = _HF.from_str(text)
        except Exception as exc:  # the Rust side raises a bare Exception
            raise ValueError(f"{source}: Hugging Face tokenizers cannot load this tokenizer.json: {exc}") from None
        return cls(tk, source=source)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "HFTokenizer":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read tokenizer file {path}: {exc}") from exc
        return cls.from_json_str(text, source=str(path))

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying ``tokenizers.Tokenizer`` (encode with ``add_special_tokens=False``)."""
        return self._tk

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as uint32; never adds BOS/EOS, special-token text stays text."""
        return np.asarray(self._tk.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Like :meth:`encode` for many texts, in parallel threads (HF releases the GIL)."""
        fast = getattr(self._tk, "encode_batch_fast", None) or self._tk.encode_batch  # fast: no offsets
        return [np.asarray(e.ids, dtype=np.uint32) for e in fast(list(texts), add_special_tokens=False)]

    def decode(self, ids: IdsLike, *, eos_text: str = "") -> str:
        """Text of ``ids``: EOS becomes ``eos_text``, BOS/PAD/MASK ids are dropped."""
        arr = _as_id_array(ids, self.vocab_size)
        return _decode_pieces(arr, self.eos_id, self._drop, eos_text,
                              lambda p: self._tk.decode(p, skip_special_tokens=False))

    def to_dict(self) -> dict[str, Any]:
        """Summary for manifest.json; the vocabulary itself is in the saved tokenizer.json."""
        return _file_summary(self)

    def save(self, path: str | os.PathLike) -> None:
        """Write the HF tokenizer.json (the bytes :attr:`sha256` covers), readable by HF tools."""
        atomic_write_text(path, self._json)

    def __reduce__(self):  # picklable for data-loader workers; keeps encode_special_tokens set
        return (HFTokenizer.from_json_str, (self._json,), {"source": self.source})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.source = state["source"]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HFTokenizer) and other.sha256 == self.sha256

    def __repr__(self) -> str:
        return f"HFTokenizer({self.source}, vocab {self.vocab_size}, eos {self.eos_id})"


def _set_special_ids(tok: Any, ids: dict[str, Optional[int]], names: dict[str, Optional[str]]) -> None:
    """The special ids of a file-backed tokenizer, and the ones ``decode`` drops (all but EOS)."""
    tok.eos_id = ids["eos"]
    tok.bos_id, tok.pad_id, tok.mask_id = ids["bos"], ids["pad"], ids["mask"]
    tok.special_tokens = {k: v for k, v in names.items() if v is not None}
    tok._drop = {i for i in (tok.bos_id, tok.pad_id, tok.mask_id) if i is not None and i != tok.eos_id}


def _file_summary(tok: Any) -> dict[str, Any]:
    """What manifest.json records of a tokenizer kept in a file: its ids and the file's hash."""
    return {
        "name": tok.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "bos_id": tok.bos_id,
        "pad_id": tok.pad_id,
        "mask_id": tok.mask_id,
        "special_tokens": dict(tok.special_tokens),
        "sha256": tok.sha256,
    }


class SentencePieceTokenizer:
    """A SentencePiece model. Saved as a distlm JSON embedding the model proto (base64).

    EOS is the model's ``eos_id()`` (``</s>`` by default), else a piece named like an EOS token;
    BOS/PAD likewise, MASK by name only. ``encode`` adds no BOS/EOS (the processor does not
    unless asked). Control pieces are never produced from text; a *user-defined* piece would
    be, so a model whose EOS is user-defined is refused on load.

    Round trips are exact only for models trained with ``normalization_rule_name=identity``,
    ``remove_extra_whitespaces=false`` and ``byte_fallback=true``; otherwise SentencePiece
    normalizes text and maps unseen characters to ``<unk>``, as it always does. Each ``encode``
    call gets SentencePiece's dummy-prefix space when the model uses one (``add_dummy_prefix``).
    """

    name = "sentencepiece"
    _FIX = ("retrain it with an EOS piece (spm_train --eos_id=2 --eos_piece='</s>', the default) or "
            "add '</s>' as a control symbol (--control_symbols='</s>')")

    def __init__(self, model_proto: bytes, *, source: str = "<in-memory sentencepiece model>"):
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(bytes(model_proto))
        except Exception as exc:
            raise ValueError(f"{source}: not a SentencePiece model ({exc})") from None
        self._sp = sp
        self._proto = bytes(model_proto)
        self.source = source
        self.sha256 = _sha256(self._proto)
        self.vocab_size: int = sp.get_piece_size()

        # The processor's own eos_id()/bos_id()/pad_id() (-1 when disabled) win whatever the
        # piece is called; otherwise a piece with a conventional name.
        builtin = {role: i for role, i in (("eos", sp.eos_id()), ("bos", sp.bos_id()), ("pad", sp.pad_id()))
                   if 0 <= i < self.vocab_size}

        def by_piece(role: str, cand: str) -> Optional[int]:
            i = sp.piece_to_id(cand)
            return i if sp.id_to_piece(i) == cand else None  # unknown pieces map to <unk>

        ids, names = _find_special_ids([lambda role, cand: builtin.get(role), by_piece], sp.id_to_piece,
                                       source, self._FIX)
        _drop_reachable_specials(lambda t: sp.encode(t), ids, names, source,
                                      "make it a control symbol (--control_symbols), not a user-defined one")
        _set_special_ids(self, ids, names)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "SentencePieceTokenizer":
        """Load a ``.model`` file written by ``spm_train`` / ``SentencePieceTrainer``."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ValueError(f"cannot read tokenizer file {path}: {exc}") from exc
        return cls(data, source=str(path))

    @property
    def model_proto(self) -> bytes:
        return self._proto

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as uint32; never adds BOS/EOS."""
        return np.asarray(self._sp.encode(text), dtype=np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.uint32) for ids in self._sp.encode(list(texts))]

    def decode(self, ids: IdsLike, *, eos_text: str = "") -> str:
        """Text of ``ids``: EOS becomes ``eos_text``, BOS/PAD/MASK ids are dropped."""
        arr = _as_id_array(ids, self.vocab_size)
        return _decode_pieces(arr, self.eos_id, self._drop, eos_text, self._sp.decode)

    def to_dict(self) -> dict[str, Any]:
        """Summary for manifest.json (the saved file adds the model itself)."""
        return _file_summary(self)

    def save(self, path: str | os.PathLike) -> None:
        """One self-contained JSON file: :meth:`to_dict` plus the model proto in base64."""
        d = self.to_dict()
        d["model_proto_b64"] = base64.b64encode(self._proto).decode("ascii")
        _save_json(d, path)

    def __reduce__(self):
        return (SentencePieceTokenizer, (self._proto,), {"source": self.source})

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.source = state["source"]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SentencePieceTokenizer) and other.sha256 == self.sha256

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.source}, vocab {self.vocab_size}, eos {self.eos_id})"


Tokenizer = Union[ByteTokenizer, CharTokenizer, HFTokenizer, SentencePieceTokenizer]


# --------------------------------------------------------------------------------------------
# Loading


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer from its saved JSON; checks sizes so a damaged spec is caught.

    Works for byte and char specs and for saved sentencepiece files (which embed the model).
    An ``hf`` summary (as recorded in manifest.json) holds no vocabulary: load the
    tokenizer.json file instead.
    """
    if not isinstance(d, dict) or "name" not in d:
        raise ValueError(f"not a tokenizer spec (expected a dict with a 'name' key): {d!r:.200}")
    name = d["name"]
    if name == "byte":
        tok: Tokenizer = ByteTokenizer()
    elif name == "char":
        if not isinstance(d.get("chars"), str):
            raise ValueError("char tokenizer spec has no 'chars' string; re-save it with CharTokenizer.save")
        tok = CharTokenizer(d["chars"])
    elif name == "sentencepiece":
        if not isinstance(d.get("model_proto_b64"), str):
            raise ValueError(
                "sentencepiece spec has no 'model_proto_b64' (a manifest.json summary does not hold the "
                "model); load the tokenizer.json in the dataset folder, or the .model file"
            )
        try:
            proto = base64.b64decode(d["model_proto_b64"], validate=True)
        except ValueError as exc:
            raise ValueError(f"sentencepiece spec: 'model_proto_b64' is not valid base64 ({exc})") from None
        tok = SentencePieceTokenizer(proto)
    elif name == "hf":
        raise ValueError(
            "an 'hf' tokenizer summary (as in manifest.json) does not hold the vocabulary; load the "
            "tokenizer.json file instead (load_tokenizer(dataset_dir) or the file's path)"
        )
    else:
        raise ValueError(f"unknown tokenizer name {name!r} in spec; known: {', '.join(TOKENIZER_KINDS)}")
    for key in ("vocab_size", "eos_id", "bos_id", "pad_id", "mask_id", "sha256"):
        if key in d and d[key] != getattr(tok, key, None):
            raise ValueError(
                f"tokenizer spec says {key}={d[key]} but the rebuilt {name} tokenizer has "
                f"{getattr(tok, key, None)}; the spec is damaged or from another version"
            )
    return tok


def _load_tokenizer_file(path: Path) -> Tokenizer:
    """Tell the file formats apart by content, not by name (every one may be "tokenizer.json")."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read tokenizer file {path}: {exc}") from exc
    if not data.lstrip()[:1] == b"{":
        # Not JSON: the only binary format is a SentencePiece model proto.
        try:
            return SentencePieceTokenizer(data, source=str(path))
        except ValueError as exc:
            raise ValueError(
                f"{path} is not a tokenizer file: not JSON, and not a SentencePiece model ({exc.__cause__ or exc})"
            ) from None
    try:
        text = data.decode("utf-8")
        d = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read tokenizer file {path}: {exc}") from exc
    if isinstance(d, dict) and "name" in d:
        try:
            tok = tokenizer_from_dict(d)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        if isinstance(tok, SentencePieceTokenizer):
            tok.source = str(path)
        return tok
    if isinstance(d, dict) and "model" in d and "added_tokens" in d:
        return HFTokenizer.from_json_str(text, source=str(path))
    raise ValueError(
        f"{path} is JSON but not a tokenizer file: neither a distlm tokenizer (key 'name') nor a "
        f"Hugging Face tokenizer.json (keys 'model' and 'added_tokens')"
    )


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """A tokenizer from ``"byte"`` or a local file/folder; never downloads anything.

    Accepted: ``"byte"``; a JSON file written by ``save`` (byte, char, sentencepiece); any
    Hugging Face tokenizer.json; a SentencePiece ``.model`` file; a dataset folder (its
    tokenizer.json). ``"char"`` is not accepted here: a char vocabulary must be fitted on a
    corpus (``CharTokenizer.fit`` or ``distlm prepare --tokenizer char``) and then loaded from
    its file.
    """
    spec_str = os.fspath(spec)
    if spec_str == "byte":
        return ByteTokenizer()
    path = Path(spec_str)
    if path.is_dir():
        if not (path / "tokenizer.json").is_file():
            raise ValueError(
                f"tokenizer folder {path} holds no tokenizer.json; pass a dataset folder written by "
                f"distlm prepare, or the path of a tokenizer file"
            )
        path = path / "tokenizer.json"
    if path.is_file():
        return _load_tokenizer_file(path)
    if spec_str == "char":
        raise ValueError(
            "the 'char' tokenizer has to be fitted on a corpus first: use `distlm prepare "
            "--tokenizer char`, then load the tokenizer.json it writes (or CharTokenizer.fit)"
        )
    raise ValueError(
        f"unknown tokenizer {spec_str!r}: choose 'byte', 'char' (fitted by prepare), or the path of a "
        f"tokenizer.json (written by distlm or Hugging Face tokenizers, e.g. `distlm tokenizer train`), "
        f"a SentencePiece .model file, or a dataset folder"
    )


def _save_json(d: dict[str, Any], path: str | os.PathLike) -> None:
    """Write atomically so a crash never leaves a half-written tokenizer behind."""
    atomic_write_text(path, json.dumps(d, indent=1) + "\n")
