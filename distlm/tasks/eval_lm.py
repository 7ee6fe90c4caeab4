"""Loss, perplexity and bits per byte of a checkpoint on a prepared dataset's split or a text file.

``distlm eval CKPT --data SHARDS_OR_TEXT`` reads every row of the data once, in file order, and
reports the mean cross-entropy per predicted token (a token-weighted mean over the whole data,
not a mean of batch means), its exponential (perplexity) and the bits per UTF-8 byte of the text
the predicted tokens stand for. ``--json`` prints one JSON object instead of the summary.

The data is either a dataset folder written by ``distlm prepare`` (its ``--split``, default
``val``): rows of ``seq_len + 1`` tokens, targets ``row[1:seq_len + 1]``, exactly as training
reads them, so ``--batch-size B --max-batches N`` with ``B x N = train.eval_iters x
train.batch_size`` gives the validation loss the run logged for the same weights. (Two cases
differ: training reads the split again from its start when it has fewer rows than that, while
eval reads each row once; and a masked LM's run averages its batches' means.) Or a text
file, read and tokenized as ``prepare`` does (one document per text file, or per JSONL record;
the checkpoint's tokenizer; EOS after each document; BOS before it if the model's dataset was
prepared with ``--add-bos``), then packed as ``prepare`` packs rows: row ``i`` is tokens
``[i*L, i*L + L + 1)`` for the model's sequence length ``L``, so consecutive rows share one
token and every token but the first is predicted exactly once. Unlike ``prepare``, the last,
shorter row is kept (its missing targets are padding that counts for nothing), so a text file
and the shards prepared from it agree on every full row and the text adds only its tail.

Bits per byte makes models with different tokenizers comparable: it is the total nats over the
predicted tokens / ln 2 / the UTF-8 bytes of those tokens' text. The bytes are counted from
the scored targets: exactly, token by token, for the byte and char tokenizers (a byte id is one
byte; a character is its UTF-8 length), so a byte-level model has bits_per_byte x ln 2 == loss,
and for byte-level BPE (GPT-2 style, ``distlm tokenizer train``), where each character of a
token's string stands for one byte, so a row cut inside a character and a masked LM's scattered
targets count what they hold. Other tokenizers (SentencePiece, other HF decoders) decode each
row's targets (a row cut inside a character or before a SentencePiece word's leading space is
off by those few bytes; a masked LM's scattered targets are decoded together). An EOS counts as
one byte, as if it were the "\\n" that separates two documents of text; BOS/PAD/MASK count none.

A masked-LM checkpoint (``model.objective=mlm``) is scored on BERT masking of every row (the
config's ``model.mask_prob`` of the tokens chosen, 80% replaced by the mask id, 10% by a random
token, 10% kept; :mod:`distlm.data.masking`). Row ``i``'s mask is drawn from (seed, ``i``), the
seed being the run's ``data.seed`` unless ``--mask-seed`` is given, so every evaluation masks
the same positions, and those the run's own validation masked: the loss is over the chosen
tokens, bits per byte over their bytes, and ``masked_accuracy`` is the share of them the
model's argmax restores. A row's last token, which a causal model only predicts, is not read.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

IGNORE = -100
"""Target of a position that is not scored (padding, unmasked MLM tokens): the loss skips it."""
LOGITS_PER_CHUNK = 1 << 25
"""Logit elements computed at once (128 MiB in float32): a big vocabulary times a big batch
would not fit otherwise; the rows are cut into chunks of the hidden states."""
PROGRESS_EVERY_S = 5.0
DTYPES = ("auto", "fp32", "bf16")


# ---------------------------------------------------------------------------------- CLI

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a run folder (its newest valid checkpoint), a checkpoints folder or one checkpoint step folder")
    p.add_argument("--data", required=True, metavar="SHARDS_OR_TEXT",
                   help="a dataset folder written by `distlm prepare` (has manifest.json), or a UTF-8 text file "
                        "(tokenized with the checkpoint's tokenizer)")
    p.add_argument("--split", default="val", help="split of a dataset folder to evaluate (default val)")
    p.add_argument("--batch-size", type=int, default=16, metavar="N", help="rows per forward pass (default 16)")
    p.add_argument("--max-batches", type=int, default=None, metavar="N",
                   help="stop after N batches, from the start of the data (default: all of it)")
    p.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights' precision; auto: fp32, or bf16 on a GPU for a run trained in bf16")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="the tokenizer.json the model was trained with, for a text file (default: the one of "
                        "the dataset named in the checkpoint's config)")
    p.add_argument("--seq-len", type=int, default=None, metavar="N",
                   help="tokens per row (default: the run's train.seq_len, else model.max_seq_len)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch CPU threads (default: torch's, or OMP_NUM_THREADS); 1 is often faster on a busy machine")
    p.add_argument("--mask-seed", type=int, default=None, metavar="N",
                   help="masked LM only: seed of the masks (default: the run's data.seed, as its validation used)")
    p.add_argument("--json", action="store_true", help="print one JSON object (loss, perplexity, bits_per_byte, ...)")


def run(args: argparse.Namespace) -> int:
    if args.threads is not None:
        import torch

        from distlm.config import ConfigError

        if args.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    progress = _Progress(lambda line: print(line, file=sys.stderr, flush=True))
    result = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, batch_size=args.batch_size,
                                 max_batches=args.max_batches, device=args.device, dtype=args.dtype,
                                 tokenizer=args.tokenizer, seq_len=args.seq_len, mask_seed=args.mask_seed,
                                 progress=progress,
                                 log=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(result) if args.json else summary(result), flush=True)
    return 0


def summary(r: dict) -> str:
    """A few human lines: what was evaluated, on what, and the three figures."""
    where = r["data"] if r["split"] is None else f"{r['data']} (split {r['split']})"
    part = "" if r["complete"] else f" (the first {r['batches']} batches of {r['rows_total']:,} rows: --max-batches)"
    lines = [
        f"checkpoint     {r['checkpoint']} (step {r['step']}, {r['objective']})",
        f"data           {where}: {r['rows']:,} rows of {r['seq_len']} tokens{part}",
        f"tokens         {r['tokens']:,} predicted, {r['bytes']:,} bytes of text",
        f"loss           {r['loss']:.4f} nats per token",
        f"perplexity     {r['perplexity']:.3f}",
        f"bits per byte  {r['bits_per_byte']:.4f}",
    ]
    if "masked_accuracy" in r:
        lines.append(f"masked acc.    {r['masked_accuracy']:.4f}")
    lines.append(f"time           {r['seconds']:.1f} s ({r['device']}, {r['dtype']})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- evaluation

@dataclass
class Totals:
    """Sums over the scored tokens; the figures are ratios of them, so batches weigh by their tokens."""

    nats: float = 0.0
    tokens: int = 0
    bytes: int = 0
    correct: int = 0
    rows: int = 0
    batches: int = 0

    def add(self, nats: float, tokens: int, n_bytes: int, correct: int, rows: int) -> None:
        self.nats += nats
        self.tokens += tokens
        self.bytes += n_bytes
        self.correct += correct
        self.rows += rows
        self.batches += 1

    @property
    def loss(self) -> float:
        return self.nats / self.tokens if self.tokens else float("nan")


@dataclass
class Batches:
    """What to evaluate: ``batches()`` yields ``(inputs, targets, keep)``: LongTensors ``[b, seq_len]``
    and the real positions (a bool tensor, or None when every position is real)."""

    batches: Callable[[], Iterator[tuple]]
    count: int            # batches that will be yielded
    total: int            # batches of the whole data (count is less with --max-batches)
    rows: int             # rows of the whole data
    seq_len: int
    tokenizer: object     # decodes the targets, for the byte count
    data: str
    split: Optional[str]


def evaluate_checkpoint(ckpt: str | os.PathLike, data: str | os.PathLike, split: str = "val", batch_size: int = 16,
                        max_batches: Optional[int] = None, device: str = "auto", dtype: str = "auto",
                        tokenizer: Optional[str] = None, seq_len: Optional[int] = None,
                        mask_seed: Optional[int] = None, progress: Optional["_Progress"] = None,
                        log: Callable[[str], None] = lambda _line: None) -> dict:
    """Evaluate checkpoint ``ckpt`` on ``data`` (a dataset folder's ``split``, or a text file).

    Returns a dict with ``loss`` (mean nats per predicted token), ``perplexity``,
    ``bits_per_byte``, ``tokens``, ``bytes``, ``rows``, ``batches``, ``complete`` (False when
    ``max_batches`` stopped it early), where it came from (``checkpoint``, ``step``, ``data``,
    ``split``: None for a text file) and how (``seq_len``, ``batch_size``, ``device``, ``dtype``,
    ``seconds``); for a masked LM also ``masked_accuracy``. Raises CheckpointError (exit 4),
    FileNotFoundError / ShardError / InputError for data (exit 3), ConfigError for options (2).
    ``mask_seed`` (masked LM only): the seed of the masks, default the run's ``data.seed``.
    """
    import torch

    from distlm.checkpoint.pretrained import load_pretrained, pick_device

    _check_counts(batch_size, max_batches, seq_len)
    t0 = time.monotonic()
    dev = pick_device(device)
    _pick_dtype(dtype, dev, {})  # a wrong flag or data path fails before the weights are read
    text = _is_text(data)
    pre = load_pretrained(ckpt, device=dev, dtype=torch.float32, log=log)
    pre.model.to(_pick_dtype(dtype, dev, pre.config))
    model_len = _model_seq_len(pre, seq_len)
    mlm = pre.model_config.objective == "mlm"
    if text:
        tok = pre.tokenizer(tokenizer)
        _check_vocab(pre, tok, data, tokenizer)
        masking = mlm_masking(pre, tok.to_dict(), tok.vocab_size, mask_seed) if mlm else None
        source = text_batches(data, tok, model_len, batch_size, max_batches,
                              add_bos=_trained_with_bos(pre.config), masking=masking)
    else:
        source = shard_batches(data, split, model_len, batch_size, max_batches, explicit_len=seq_len is not None,
                               masking=(lambda m: mlm_masking(pre, m.tokenizer, m.vocab_size, mask_seed, split)) if mlm
                               else None, check_tokenizer=lambda data_tok: _check_tokenizers(pre, data_tok, data))
        source.tokenizer = source.tokenizer or pre.tokenizer(tokenizer)
        _check_vocab(pre, source.tokenizer, data, tokenizer)
    totals = _score(pre.model, source, dev, progress)
    param_dtype = next(pre.model.parameters()).dtype
    return _result(pre, source, totals, batch_size, dev, param_dtype, mlm, time.monotonic() - t0)


def _check_counts(batch_size: int, max_batches: Optional[int], seq_len: Optional[int]) -> None:
    from distlm.config import ConfigError

    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if max_batches is not None and max_batches < 1:
        raise ConfigError(f"--max-batches must be >= 1, got {max_batches} (leave it out to read all the data)")
    if seq_len is not None and seq_len < 1:
        raise ConfigError(f"--seq-len must be >= 1, got {seq_len}")


def _pick_dtype(name: str, device, config: dict):
    """fp32 unless asked; ``auto`` takes bf16 only on a GPU for a run trained in bf16, so its
    validation loss is reproduced, and never on a CPU, where bf16 is slower and less exact."""
    import torch

    from distlm.checkpoint.pretrained import native_bf16
    from distlm.config import ConfigError

    if name not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    if name == "auto":
        trained_bf16 = (config.get("train") or {}).get("precision") == "bf16"
        name = "bf16" if trained_bf16 and native_bf16(device) else "fp32"
    return torch.bfloat16 if name == "bf16" else torch.float32


def _model_seq_len(pre, requested: Optional[int]) -> int:
    """``--seq-len``, else the run's train.seq_len, else model.max_seq_len (never past it)."""
    from distlm.config import ConfigError

    longest = pre.model_config.max_seq_len
    if requested is not None:
        if requested > longest:
            raise ConfigError(f"--seq-len {requested} exceeds the model's max_seq_len {longest}")
        return requested
    return int((pre.config.get("train") or {}).get("seq_len") or longest)


def _is_text(data: str | os.PathLike) -> bool:
    """A plain file is text; a folder (or URL) is a dataset. A missing path is an error naming it."""
    text = os.fspath(data)
    if "://" in text or text.startswith("pipe:"):
        return False
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"--data {text}: no such file or folder (give a dataset folder written by "
                                f"`distlm prepare` or a UTF-8 text file)")
    return path.is_file() and path.name != "manifest.json"


def _trained_with_bos(config: dict) -> bool:
    """Whether the model's dataset starts documents with BOS (``prepare --add-bos``); False if unknown."""
    data = config.get("data") or {}
    path = data.get("path") or next((s.get("path") for s in data.get("sources") or [] if s.get("path")), None)
    try:
        return bool(json.loads((Path(path) / "manifest.json").read_text()).get("add_bos"))
    except (OSError, ValueError, TypeError, AttributeError):
        return False


def _check_tokenizers(pre, data_tok, data) -> None:
    """Shards of another tokenizer than the model's give a meaningless loss: refuse them.

    Checked only when the model's tokenizer can be found (its dataset may live elsewhere)."""
    from distlm.checkpoint.errors import CheckpointError
    from distlm.data.inputs import InputError
    from distlm.data.prepare_resume import tokenizer_digest

    try:
        model_tok = pre.tokenizer()
    except CheckpointError:
        return
    if data_tok is not None and tokenizer_digest(model_tok) != tokenizer_digest(data_tok):
        raise InputError(f"--data {data} was prepared with another tokenizer ({data_tok.name}, "
                         f"{data_tok.vocab_size} ids) than the model was trained with ({model_tok.name}, "
                         f"{model_tok.vocab_size} ids); prepare the text again with --tokenizer set to the "
                         f"model's tokenizer.json")


def _check_vocab(pre, tok, data, override: Optional[str]) -> None:
    from distlm.config import ConfigError

    if tok is not None and tok.vocab_size > pre.model_config.vocab_size:
        flag = f"--tokenizer {override}" if override else f"the tokenizer of --data {data}"
        raise ConfigError(f"{flag} has {tok.vocab_size} ids but the model only {pre.model_config.vocab_size}: "
                          f"it is not the tokenizer the model was trained with")


# ---------------------------------------------------------------------------------- data

def shard_batches(data, split: str, seq_len: int, batch_size: int, max_batches: Optional[int],
                  explicit_len: bool = False, masking: Optional[Callable] = None,
                  check_tokenizer: Optional[Callable] = None) -> Batches:
    """Every row of a dataset's ``split`` in file order, ``batch_size`` rows a batch (the last one shorter).

    Rows are cut to ``seq_len`` (the model's) as training cuts them; a dataset with shorter rows
    is read at its own length, unless ``--seq-len`` asked for more (an error). ``masking``:
    for a masked LM, ``manifest -> MLMMasking``; the stream masks row ``i`` from position ``i``
    as the training run's validation stream does. ``check_tokenizer(the dataset's tokenizer or
    None)`` runs first, so a dataset of another tokenizer is named as such before its masking fails.
    """
    from distlm.data.inputs import InputError
    from distlm.data.shards import load_manifest
    from distlm.data.stream import TokenStream

    location = os.fspath(data)
    if Path(location).name == "manifest.json" and Path(location).is_file():
        location = str(Path(location).parent)
    try:
        manifest = load_manifest(location)
    except ValueError as e:
        raise InputError(f"--data {location}: {e}") from None
    if split not in manifest.splits:
        raise InputError(f"--data {location} has no split {split!r}; its splits are: "
                         f"{', '.join(sorted(manifest.splits))} (pick one with --split)")
    tokenizer = _local_tokenizer(location)
    if check_tokenizer is not None:
        check_tokenizer(tokenizer)
    if seq_len > manifest.seq_len:
        if explicit_len:
            raise InputError(f"--seq-len {seq_len}: rows of --data {location} hold only {manifest.seq_len} + 1 "
                             f"tokens; use --seq-len {manifest.seq_len} or less")
        seq_len = manifest.seq_len
    try:
        stream = TokenStream(location, split, micro_batch_size=batch_size, shuffle=False, seq_len=seq_len,
                             masking=masking(manifest) if masking else None)
    except ValueError as e:
        raise InputError(f"--data {location}: {e}") from None
    rows = stream.rows_per_epoch
    total = -(-rows // batch_size)
    count = min(total, max_batches or total)

    def batches():
        # The stream never ends (epoch after epoch): take the batches covering the split once and
        # drop the rows of the last one that wrap around to the next epoch.
        it = iter(stream)
        for k in range(count):
            micro = next(it)
            keep = min(batch_size, rows - k * batch_size)
            yield micro.inputs[:keep], micro.targets[:keep], None

    return Batches(batches, count, total, rows, seq_len, tokenizer, location, split)


def _local_tokenizer(location: str):
    """The dataset's own tokenizer.json (None for a remote dataset: the model's is used then)."""
    from distlm.data.inputs import InputError
    from distlm.data.tokenizers import load_tokenizer

    if "://" in location or location.startswith("pipe:"):
        return None
    try:
        return load_tokenizer(location)
    except ValueError as e:
        raise InputError(f"--data {location}: cannot read its tokenizer ({e}); re-run `distlm prepare`") from None


def text_tokens(path, tokenizer, add_bos: bool = False):
    """The token stream of a text file as ``prepare`` makes it: EOS after each document
    (the file, or each JSONL record), BOS before it with ``add_bos``. A uint32/int64 numpy array."""
    import numpy as np

    from distlm.data.inputs import InputError, NotUtf8, read_documents

    parts = []
    try:
        for piece in read_documents(Path(path), "text"):
            if add_bos and piece.start and tokenizer.bos_id is not None:
                parts.append(np.array([tokenizer.bos_id], dtype=np.int64))
            parts.append(np.asarray(tokenizer.encode(piece.text), dtype=np.int64))
            if piece.end:
                parts.append(np.array([tokenizer.eos_id], dtype=np.int64))
    except NotUtf8 as e:
        raise InputError(f"--data {path}: not UTF-8 text (invalid byte at offset {e.offset}); give a UTF-8 "
                         f"text file or a dataset folder") from None
    except InputError:
        raise
    except ValueError as e:  # a character the char tokenizer does not know
        raise InputError(f"--data {path}: the model's tokenizer cannot encode this text, so the model cannot "
                         f"be evaluated on it: {e}") from None
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def text_rows(n_tokens: int, seq_len: int) -> int:
    """Rows of a text of ``n_tokens``: one every ``seq_len`` tokens while a target is left."""
    return -(-(n_tokens - 1) // seq_len) if n_tokens > 1 else 0


def text_batches(path, tokenizer, seq_len: int, batch_size: int, max_batches: Optional[int],
                 add_bos: bool = False, masking=None) -> Batches:
    """A text file's rows (``prepare``'s packing, the last short row padded), ``batch_size`` a batch.

    ``masking`` (an ``MLMMasking``, for a masked LM): inputs are a row's first ``seq_len`` tokens,
    masked from the row's index as the shards' rows are; padding is neither attended to nor scored.
    """
    import numpy as np
    import torch

    from distlm.data.inputs import InputError

    ids = text_tokens(path, tokenizer, add_bos)
    rows = text_rows(len(ids), seq_len)
    if rows == 0:
        raise InputError(f"--data {path}: the text gives {len(ids)} token(s), its closing EOS included (an empty "
                         f"text gives only that EOS); at least 2 are needed to predict one")
    total = -(-rows // batch_size)
    count = min(total, max_batches or total)
    L = seq_len

    def batches():
        for k in range(count):
            first, last = k * batch_size, min(rows, (k + 1) * batch_size)
            window = np.zeros((last - first, L + 1), dtype=np.int64)
            length = np.zeros(last - first, dtype=np.int64)
            for j, i in enumerate(range(first, last)):
                row = ids[i * L:i * L + L + 1]
                window[j, :len(row)] = row
                length[j] = len(row)
            if masking is None:
                x, y = window[:, :L], window[:, 1:].copy()
                y[np.arange(L)[None, :] >= length[:, None] - 1] = IGNORE
                yield torch.from_numpy(x), torch.from_numpy(y), None  # causal: padding after a row is unseen
                continue
            real = np.arange(L)[None, :] < length[:, None]
            x, y = masking.apply(window[:, :L], np.arange(first, last))
            x[~real], y[~real] = 0, IGNORE
            yield torch.from_numpy(x), torch.from_numpy(y), None if real.all() else torch.from_numpy(real)

    return Batches(batches, count, total, rows, seq_len, tokenizer, os.fspath(path), None)


# ---------------------------------------------------------------------------------- bytes

def target_bytes(tokenizer, targets) -> int:
    """UTF-8 bytes of the text that the scored targets stand for (see the module docstring).

    ``targets``: ``[rows, T]`` ids (a tensor, or rows of any lengths); negative ids (not scored)
    count nothing.
    Byte, char and byte-level BPE tokenizers are counted token by token (exact whatever cuts the
    rows, or picks the targets); the others by decoding each row's scored ids, an EOS written as
    one "\\n".
    """
    import numpy as np

    rows = [targets.cpu().numpy()] if hasattr(targets, "cpu") else [np.asarray(row) for row in targets]
    table = _byte_table(tokenizer)
    if table is not None:
        return sum(int(table[row[row >= 0]].sum()) for row in rows)
    return sum(len(tokenizer.decode(row[row >= 0], eos_text="\n").encode("utf-8"))
               for block in rows for row in block.reshape(-1, block.shape[-1]))


def _byte_table(tokenizer):
    """Bytes of each id, where every id has a fixed number of bytes (byte, char, byte-level BPE); else None."""
    import numpy as np

    if tokenizer.name == "byte":
        return np.ones(tokenizer.vocab_size, dtype=np.int64)  # ids 0..255 and EOS: one byte each
    if tokenizer.name == "char":
        return np.array([len(c.encode("utf-8")) for c in tokenizer.chars] + [1], dtype=np.int64)
    if tokenizer.name == "hf":
        key = getattr(tokenizer, "sha256", None)
        if key is None:
            return _byte_level_table(tokenizer)
        if key not in _BYTE_LEVEL_TABLES:
            _BYTE_LEVEL_TABLES[key] = _byte_level_table(tokenizer)
        return _BYTE_LEVEL_TABLES[key]
    return None


_BYTE_LEVEL_TABLES: dict = {}
"""Byte tables of the HF tokenizers seen, by the tokenizer.json's SHA-256 (a vocabulary is read once)."""


def _byte_level_table(tokenizer):
    """Bytes of each id of a byte-level BPE (its decoder is HF's ``ByteLevel``); None for any other.

    Such a tokenizer spells each byte with one of 256 characters, and its decoder turns each
    character of a token's string back into that byte (a token with a character outside them, an
    added token, is its own UTF-8): decoding a row gives exactly the sum of these, and a token
    that holds part of a character counts its part, where decoding it alone or next to other
    tokens' parts would give a 3-byte U+FFFD.
    """
    import numpy as np

    hf = getattr(tokenizer, "hf_tokenizer", None)
    if hf is None:
        return None
    try:
        decoder = json.loads(hf.to_str()).get("decoder") or {}
        from tokenizers.pre_tokenizers import ByteLevel
    except (ValueError, ImportError):
        return None
    if decoder.get("type") != "ByteLevel":
        return None
    alphabet = set(ByteLevel.alphabet())
    table = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        token = hf.id_to_token(i)
        if token:  # None: a gap in the ids, which no text encodes to
            table[i] = len(token) if alphabet.issuperset(token) else len(token.encode("utf-8"))
    for special in (tokenizer.bos_id, tokenizer.pad_id, tokenizer.mask_id):
        if special is not None:
            table[special] = 0  # decode drops them
    table[tokenizer.eos_id] = 1  # written as the "\n" between documents
    return table


# ---------------------------------------------------------------------------------- scoring

def _score(model, source: Batches, device, progress: Optional["_Progress"]) -> Totals:
    import torch

    totals = Totals()
    if progress is not None:
        progress.start(source.count)
    with torch.no_grad():
        for inputs, targets, keep in source.batches():
            nats, n, correct = batch_nats(model, inputs.to(device), targets.to(device),
                                          None if keep is None else keep.to(device))
            totals.add(nats, n, target_bytes(source.tokenizer, targets), correct, len(targets))
            if progress is not None:
                progress.update(totals)
    return totals


def batch_nats(model, inputs, targets, keep=None) -> tuple[float, int, int]:
    """(sum of cross-entropy in nats, scored tokens, argmax hits) over the targets that are not -100.

    ``keep``: the real (not padding) positions, for a bidirectional model; None: all of them.
    The LM head runs on a few rows at a time, so the logits of a big vocabulary never have to
    exist for the whole batch at once; the softmax is taken in float32 as in training.
    """
    import torch
    import torch.nn.functional as F

    features = model.features(inputs, keep)
    rows, T = targets.shape
    step = max(1, LOGITS_PER_CHUNK // max(1, T * model.cfg.vocab_size))
    nats = torch.zeros((), dtype=torch.float64, device=targets.device)
    correct = torch.zeros((), dtype=torch.int64, device=targets.device)
    for r in range(0, rows, step):
        logits = model.logits_of(features[r:r + step]).float()
        y = targets[r:r + step]
        nats += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), ignore_index=IGNORE,
                                reduction="sum").double()
        correct += ((logits.argmax(-1) == y) & (y != IGNORE)).sum()
    return float(nats), int((targets != IGNORE).sum()), int(correct)


def mlm_masking(pre, tokenizer: dict, vocab_size: int, seed: Optional[int] = None, split: str = "val"):
    """BERT masking as the run masked its validation rows: its ``model.mask_prob``, and by
    default its ``data.seed``, so the same rows get the same masks and the run's logged
    validation loss is reproduced; the mask id must be one the model has an embedding for."""
    from distlm.checkpoint.errors import CheckpointError
    from distlm.data.masking import MLMMasking

    if seed is None:
        seed = int((pre.config.get("data") or {}).get("seed", 1234))
    masking = MLMMasking.for_tokenizer(tokenizer, vocab_size, pre.model_config.mask_prob, seed, split)
    if masking.mask_id >= pre.model_config.vocab_size:
        raise CheckpointError(f"{pre.folder}: the masked-LM model has {pre.model_config.vocab_size} ids, none "
                              f"for the mask id {masking.mask_id} of this tokenizer; it was trained with another "
                              f"tokenizer")
    return masking


# ---------------------------------------------------------------------------------- report

def _result(pre, source: Batches, t: Totals, batch_size: int, device, param_dtype, mlm: bool,
            seconds: float) -> dict:
    import torch

    from distlm.data.inputs import InputError

    if t.tokens == 0:
        raise InputError(f"--data {source.data}: no token was scored (every target was masked or padding)")
    loss = t.loss
    result = {
        "loss": loss,
        "perplexity": math.exp(loss) if loss < 700 else float("inf"),
        "bits_per_byte": t.nats / math.log(2) / t.bytes if t.bytes else float("nan"),
        "tokens": t.tokens,
        "bytes": t.bytes,
        "checkpoint": str(pre.folder),
        "step": pre.step,
        "data": source.data,
        "split": source.split,
        "objective": pre.model_config.objective,
        "rows": t.rows,
        "rows_total": source.rows,
        "batches": t.batches,
        "complete": source.count == source.total,
        "seq_len": source.seq_len,
        "batch_size": batch_size,
        "tokenizer": getattr(source.tokenizer, "name", None),
        "device": str(device),
        "dtype": "bf16" if param_dtype == torch.bfloat16 else "fp32",
        "seconds": round(seconds, 3),
    }
    if mlm:
        result["masked_accuracy"] = t.correct / t.tokens
    return result


class _Progress:
    """A line on stderr every few seconds of a long evaluation (nothing for a short one)."""

    def __init__(self, log: Callable[[str], None], every_s: float = PROGRESS_EVERY_S):
        self.log, self.every_s = log, every_s

    def start(self, total: int) -> None:
        self.total = total
        self.t0 = self.last = time.monotonic()

    def update(self, t: Totals) -> None:
        now = time.monotonic()
        if now - self.last < self.every_s:
            return
        self.last = now
        rate = t.tokens / max(now - self.t0, 1e-9)
        self.log(f"eval: batch {t.batches:,}/{self.total:,}, {t.tokens:,} tokens ({rate:,.0f}/s), "
                 f"loss so far {t.loss:.4f}")
