"""``distlm tokenizer train``: train a byte-level BPE tokenizer.json with Hugging Face ``tokenizers``.

Byte-level (GPT-2 style): text is split with the GPT-2 pre-tokenizer regex, mapped to its UTF-8
bytes, and all 256 bytes are in the vocabulary from the start, so any text encodes without
``<unk>`` and ``decode(encode(s)) == s``. No prefix space is added and there is no normalizer,
for the same reason.

Special tokens have fixed low ids, the same in every trained tokenizer:

====  =================  =====================================================
 id   token              role
====  =================  =====================================================
 0    ``<|endoftext|>``  EOS: appended by ``distlm prepare`` after each document
 1    ``<|pad|>``        PAD
 2    ``<|mask|>``       MASK
 3    ``<|bos|>``        BOS (never added by ``encode``)
====  =================  =====================================================

then the 256 byte tokens (ids 4..259), then the merges. The output is the plain HF tokenizer.json
(HF tools and ``transformers.PreTrainedTokenizerFast(tokenizer_file=...)`` read it); distlm
loads it with :func:`distlm.data.tokenizers.load_tokenizer`, which finds these ids by name.

Inputs are read like ``prepare`` reads them (text files, folders, .jsonl, .jsonl.zst; see
:mod:`distlm.data.inputs`) and streamed into the trainer piece by piece (text files arrive in
chunks of a few MB), so memory holds the word counts, not the corpus. Training is
deterministic: the same inputs and options give a byte-identical tokenizer.json. Nothing is
downloaded.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, Union

from distlm.fsutil import atomic_write_text

from .inputs import InputError, NotUtf8, find_input_files, read_documents

__all__ = [
    "BOS_TOKEN",
    "EOS_TOKEN",
    "MASK_TOKEN",
    "MIN_VOCAB_SIZE",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TokenizerTrainError",
    "train_bpe",
]

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"
MASK_TOKEN = "<|mask|>"
BOS_TOKEN = "<|bos|>"
SPECIAL_TOKENS = (EOS_TOKEN, PAD_TOKEN, MASK_TOKEN, BOS_TOKEN)
"""In id order: EOS=0, PAD=1, MASK=2, BOS=3 (the trainer gives special tokens the first ids)."""
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS) + 1
"""The 256 bytes and the specials are always in the vocabulary; below this there is no merge."""

Log = Callable[[str], Any]


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


class TokenizerTrainError(InputError):
    """The inputs or options cannot train a tokenizer; the message says what to change."""


def _check_options(vocab_size: int, min_frequency: int, out: Path) -> None:
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerTrainError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE already holds 256 byte tokens and "
            f"{len(SPECIAL_TOKENS)} special tokens, so it must be at least {MIN_VOCAB_SIZE} (common choices: "
            f"8192, 32000, 50304)"
        )
    if min_frequency < 0:
        raise TokenizerTrainError(f"--min-frequency must be >= 0, got {min_frequency}")
    if out.is_dir():
        raise TokenizerTrainError(f"--out {out} is a folder; give a file path such as {out / 'tokenizer.json'}")


def _new_tokenizer_and_trainer(vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    # add_prefix_space=False: a leading space would be invented, breaking decode(encode(s)) == s.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # its bar is for terminals; progress lines go through `log`
    )
    return tk, trainer


def train_bpe(
    inputs: Sequence[Union[str, os.PathLike]],
    out: Union[str, os.PathLike],
    vocab_size: int,
    *,
    text_field: str = "text",
    min_frequency: int = 2,
    log: Log = print,
    progress_s: float = 5.0,
) -> dict[str, Any]:
    """Train a byte-level BPE on ``inputs`` and write its tokenizer.json to ``out`` (atomically).

    ``min_frequency``: a pair must occur this often to be merged (2 keeps one-off strings out of
    the vocabulary). Files that are not UTF-8 are skipped with one log line (text already read
    from such a file before the bad byte stays in the counts: the file is read in chunks).
    Returns a summary: out, vocab_size, documents, files, skipped_files, bytes, seconds.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = Path(out)
    _check_options(vocab_size, min_frequency, out)
    if not inputs:
        raise TokenizerTrainError("no inputs given; pass text files, folders or .jsonl/.jsonl.zst files")
    # The output may sit inside an input folder: an earlier tokenizer.json is not training text.
    skip = {out.resolve(), out.resolve().with_name(out.name + ".tmp")}
    files = [p for p in find_input_files(inputs) if p.resolve() not in skip]
    if not files:
        raise TokenizerTrainError(f"no input files found in {', '.join(map(str, inputs))} (hidden files are skipped)")
    out.parent.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    stats = {"files": 0, "skipped_files": 0, "documents": 0, "bytes": 0, "chars": 0}
    last = [t0]

    def progress() -> str:
        return (f"tokenizer train: read {stats['files'] + stats['skipped_files']}/{len(files)} files, "
                f"{_n(stats['documents'], 'document')}, {stats['bytes'] / 1e6:.1f} MB, "
                f"{time.monotonic() - t0:.1f} s")

    def texts() -> Iterator[str]:
        for path in files:
            try:
                for piece in read_documents(path, text_field):
                    stats["bytes"] += piece.nbytes
                    stats["documents"] += piece.end
                    if piece.text:
                        stats["chars"] += len(piece.text)
                        yield piece.text
                    now = time.monotonic()
                    if now - last[0] >= progress_s:
                        last[0] = now
                        log(progress())
            except NotUtf8 as exc:
                log(f"skipping {path}: not valid UTF-8 (near byte {exc.offset}); binary file?")
                stats["skipped_files"] += 1
                continue
            except OSError as exc:
                raise TokenizerTrainError(f"cannot read input {path}: {exc}") from exc
            stats["files"] += 1
        log(progress() + "; computing merges")

    tk, trainer = _new_tokenizer_and_trainer(vocab_size, min_frequency)
    tk.train_from_iterator(texts(), trainer=trainer)
    if stats["chars"] == 0:
        raise TokenizerTrainError(
            f"no text found: {stats['skipped_files']} of {len(files)} input files were skipped as not UTF-8, "
            f"the rest are empty"
        )
    for i, token in enumerate(SPECIAL_TOKENS):  # the documented ids; a tokenizers change would break them
        if tk.token_to_id(token) != i:
            raise RuntimeError(f"trained tokenizer has {token!r} at id {tk.token_to_id(token)}, expected {i}")
    got = tk.get_vocab_size(with_added_tokens=True)
    if got < vocab_size:
        log(f"note: the corpus only supports {got} tokens with --min-frequency {min_frequency} "
            f"(asked for {vocab_size}); more text or a lower --min-frequency gives more merges")
    atomic_write_text(out, tk.to_str(pretty=True))
    seconds = time.monotonic() - t0
    summary = {
        "out": str(out),
        "vocab_size": got,
        "documents": stats["documents"],
        "files": stats["files"],
        "skipped_files": stats["skipped_files"],
        "bytes": stats["bytes"],
        "seconds": round(seconds, 3),
    }
    mb = stats["bytes"] / 1e6
    log(
        f"trained byte-level BPE {out}: vocab {got} (EOS {EOS_TOKEN}=0, PAD=1, MASK=2, BOS=3); "
        f"{_n(stats['documents'], 'document')} from {_n(stats['files'], 'file')} ({stats['skipped_files']} skipped), "
        f"{mb:.1f} MB in {seconds:.1f} s"
    )
    return summary
