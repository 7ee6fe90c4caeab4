"""Fine-tune a pretrained checkpoint as a sequence classifier on labelled JSONL (one object a line,
a text field and a label field), report its held-out accuracy next to the majority-class
baseline, and save the classifier to --out.

The model is the checkpoint's Transformer body, a pooling of its final hidden states (``last``
real token for a causal body, ``mean`` over the real tokens for a bidirectional one), dropout and
a linear head (:mod:`distlm.model.classifier`). Texts are encoded with the checkpoint's tokenizer,
cut to ``--max-len`` tokens (keeping the start) and right-padded; padding is never attended to.
Training runs in this one process (CPU or one GPU): AdamW on the body and the head (only the head
with ``--freeze-body``), linear warmup then cosine or linear decay to zero, gradient clipping at
1.0, and a fixed seed, so a run is reproducible (bit for bit on the CPU; on a GPU the attention
kernels' backward may differ in the last bits from run to run).

Labels may be strings or integers; the class ids follow their sorted string forms, and
``classifier.json`` records them in class-id order. Held-out data is ``--val FILE`` or, by default,
a seeded split of the training file (``--val-fraction``, 0.1), drawn from every class alike.

``--out DIR`` (a new or empty folder, or an earlier classifier's, which is replaced: its
``classifier.json`` is removed before training starts and written last, as the mark of a finished
save) receives ``classifier.safetensors`` (body + head), ``tokenizer.json``,
``classifier.json`` (source checkpoint, labels, pooling, max_len, model config, final metrics) and
``metrics.jsonl`` (one line per evaluation). :func:`load_classifier` and :func:`predict` use them.

Errors: a bad flag exits 2 (ConfigError), bad data 3 (InputError, naming the file and line), an
unusable checkpoint 4.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"
TOKENIZER_FILE = "tokenizer.json"
METRICS_FILE = "metrics.jsonl"
FORMAT = "distlm-classifier"
FORMAT_VERSION = 1
HEAD_DROPOUT = 0.1
GRAD_CLIP = 1.0


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", metavar="CKPT",
                   help="a run folder (its newest valid checkpoint), a checkpoints folder or one checkpoint "
                        "step folder of a pretrained distlm model, of any parallel layout")
    p.add_argument("--train", required=True, metavar="TRAIN.jsonl", help="labelled training examples")
    held = p.add_mutually_exclusive_group()
    held.add_argument("--val", metavar="VAL.jsonl", default=None,
                      help="labelled held-out examples (default: a split of --train, see --val-fraction)")
    held.add_argument("--val-fraction", metavar="F", type=float, default=None,
                      help="share of --train held out when there is no --val, drawn from every class "
                           "alike with a seeded shuffle (default 0.1)")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write the classifier into: new, empty, or an earlier classifier's (replaced)")
    p.add_argument("--text-field", metavar="NAME", default="text", help="JSON field holding the text (default text)")
    p.add_argument("--label-field", metavar="NAME", default="label",
                   help="JSON field holding the label (default label)")
    p.add_argument("--steps", metavar="N", type=int, default=200, help="optimizer steps (default 200)")
    p.add_argument("--batch-size", metavar="B", type=int, default=32, help="examples per step (default 32)")
    p.add_argument("--lr", metavar="LR", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    p.add_argument("--weight-decay", metavar="WD", type=float, default=0.01,
                   help="AdamW weight decay on matrices, not on biases or norm gains (default 0.01)")
    p.add_argument("--warmup-steps", metavar="N", type=int, default=None,
                   help="linear warmup steps (default: a tenth of --steps)")
    p.add_argument("--decay", choices=["cosine", "linear"], default="cosine",
                   help="learning-rate decay to zero after the warmup (default cosine)")
    p.add_argument("--pooling", choices=["auto", "last", "mean"], default="auto",
                   help="auto: last real token for a causal model, mean over real tokens for a "
                        "bidirectional (mlm) one")
    p.add_argument("--max-len", metavar="N", type=int, default=None,
                   help="tokens kept from the start of each text (default and maximum: the model's max_seq_len)")
    p.add_argument("--freeze-body", action="store_true",
                   help="train only the classification head; the pretrained body stays as it is")
    p.add_argument("--from-scratch", action="store_true",
                   help="start the body from random weights of the checkpoint's shape instead of its "
                        "trained ones (a baseline that shows what pretraining is worth)")
    p.add_argument("--seed", metavar="S", type=int, default=0,
                   help="seeds the split, the batch order and dropout (default 0)")
    p.add_argument("--device", metavar="DEVICE", default="auto",
                   help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="compute precision; bf16 is autocast over float32 weights (auto: bf16 on a GPU "
                        "that supports it, else fp32)")
    p.add_argument("--tokenizer", default=None, metavar="FILE",
                   help="the tokenizer the model was trained with, if its dataset is not where the "
                        "checkpoint's config says")
    p.add_argument("--eval-every", metavar="N", type=int, default=50,
                   help="evaluate on the held-out split every N steps, and at the end (default 50)")
    p.add_argument("--json", action="store_true", help="print one JSON object of the results on stdout")


def run(args: argparse.Namespace) -> int:
    result = finetune_classifier(
        args.checkpoint, args.train, args.out, val_path=args.val, val_fraction=args.val_fraction,
        text_field=args.text_field, label_field=args.label_field, steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, decay=args.decay,
        pooling=args.pooling, max_len=args.max_len, freeze_body=args.freeze_body,
        from_scratch=args.from_scratch, seed=args.seed, device=args.device, dtype=args.dtype,
        tokenizer=args.tokenizer, eval_every=args.eval_every, log=_stderr)
    if args.json:
        keys = ("accuracy", "majority_baseline", "n_train", "n_val", "n_classes", "labels", "steps", "out",
                "val_loss", "from_scratch", "checkpoint", "checkpoint_step")
        print(json.dumps({k: result[k] for k in keys}), flush=True)
    else:
        print(f"classifier saved to {result['out']}")
        print(f"  held-out accuracy {result['accuracy']:.4f} vs majority-class baseline "
              f"{result['majority_baseline']:.4f} ({result['n_val']} held-out, {result['n_train']} training "
              f"examples, {result['n_classes']} classes, {result['steps']} steps)", flush=True)
    return 0


# --------------------------------------------------------------------------- examples


@dataclass
class Example:
    text: str
    label: str  # the label's string form: class ids follow their sort order
    line: int   # 1-based line in its file, for error messages


def _input_error(message: str):
    from distlm.data.inputs import InputError

    return InputError(message)


def label_string(value, where: str) -> str:
    """A label's string form. Strings and integers only: a float or a bool is almost always a
    mistake in the data (1.0 and 1 would be two classes), so it is refused, not guessed."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise _input_error(f"{where}: the label must be a string or an integer; got {type(value).__name__} "
                           f"{value!r}")
    text = str(value)
    if not text.strip():
        raise _input_error(f"{where}: the label is empty")
    return text


def read_examples(path: str | os.PathLike, text_field: str = "text", label_field: str = "label",
                  flag: str = "--train") -> list[Example]:
    """Every (text, label) of a JSONL file; blank lines are skipped, anything else wrong is an
    InputError naming the file, the line and the fix."""
    path = Path(path)
    if not path.is_file():
        raise _input_error(f"{flag} {path}: no such file (give a JSONL file of objects with "
                           f"'{text_field}' and '{label_field}' fields)")
    examples = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    examples.append(_parse_line(line, f"{path}:{number}", number, text_field, label_field))
    except UnicodeDecodeError as e:
        raise _input_error(f"{flag} {path}: not UTF-8 text ({e}); save the file as UTF-8 JSONL") from None
    if not examples:
        raise _input_error(f"{flag} {path}: no examples (the file is empty or blank)")
    return examples


def _parse_line(line: str, where: str, number: int, text_field: str, label_field: str) -> Example:
    try:
        record = json.loads(line)
    except ValueError as e:
        raise _input_error(f"{where}: not valid JSON ({e}); each line must be one JSON object") from None
    if not isinstance(record, dict):
        raise _input_error(f"{where}: expected a JSON object with '{text_field}' and '{label_field}', "
                           f"got a JSON {type(record).__name__}")
    for name, flag in ((text_field, "--text-field"), (label_field, "--label-field")):
        if name not in record:
            raise _input_error(f"{where}: no '{name}' field (the object has {sorted(record)}); "
                               f"fix the line or choose the field with {flag}")
    text = record[text_field]
    if not isinstance(text, str):
        raise _input_error(f"{where}: '{text_field}' must be a string; got {type(text).__name__}")
    if not text.strip():
        raise _input_error(f"{where}: '{text_field}' is empty; remove the line or give it text")
    return Example(text, label_string(record[label_field], where), number)


def class_labels(examples: Sequence[Example], path) -> list[str]:
    """The classes, in class-id order (sorted string forms); at least two are needed."""
    labels = sorted({e.label for e in examples})
    if len(labels) < 2:
        raise _input_error(f"--train {path}: every one of its {len(examples)} examples has the label "
                           f"{labels[0]!r}; a classifier needs at least 2 classes")
    return labels


def check_val_labels(val: Sequence[Example], labels: Sequence[str], path) -> None:
    """A held-out label the training set never shows cannot be predicted: refuse it, naming the line."""
    known = set(labels)
    for e in val:
        if e.label not in known:
            raise _input_error(f"{path}:{e.line}: label {e.label!r} never occurs in the training data "
                               f"(its labels: {', '.join(map(repr, labels))}); add training examples of it "
                               f"or drop it from the held-out file")


def split_examples(examples: Sequence[Example], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): ``fraction`` of each class, chosen by a seeded shuffle.

    Per class, so the held-out split has the training set's class balance (and the majority
    baseline means the same on both); each class keeps at least one training example.
    """
    rng = random.Random(seed)
    by_label: dict[str, list[Example]] = {}
    for e in examples:
        by_label.setdefault(e.label, []).append(e)
    train, val = [], []
    for label in sorted(by_label):
        group = by_label[label][:]
        rng.shuffle(group)
        n_val = min(len(group) - 1, round(len(group) * fraction))
        val += group[:n_val]
        train += group[n_val:]
    # Back to file order, so neither split is grouped by class.
    return sorted(train, key=lambda e: e.line), sorted(val, key=lambda e: e.line)


def encode_examples(examples: Sequence[Example], tokenizer, max_len: int, path) -> tuple[list[list[int]], int]:
    """Token ids of each text cut to its first ``max_len`` tokens, and how many texts were cut."""
    encoded, cut = [], 0
    for e in examples:
        try:
            ids = [int(i) for i in tokenizer.encode(e.text)]
        except ValueError as err:
            raise _input_error(f"{path}:{e.line}: the model's tokenizer cannot encode the text: {err}") from None
        if not ids:
            raise _input_error(f"{path}:{e.line}: the text encodes to no tokens")
        cut += len(ids) > max_len
        encoded.append(ids[:max_len])
    return encoded, cut


def majority_baseline(targets: Sequence[int]) -> float:
    """Accuracy of always answering the held-out split's most common class: the best any constant
    guess can do there, so a classifier has to beat it to have learned anything from the text."""
    return max(Counter(targets).values()) / len(targets)


# --------------------------------------------------------------------------- settings


@dataclass
class Settings:
    """The checked hyperparameters of one fine-tuning run (they go into classifier.json)."""

    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    decay: str
    eval_every: int
    freeze_body: bool
    from_scratch: bool
    seed: int


def _config_error(message: str):
    from distlm.config import ConfigError

    return ConfigError(message)


def check_settings(steps, batch_size, lr, weight_decay, warmup_steps, decay, eval_every, val_path, val_fraction,
                   freeze_body, from_scratch, seed) -> tuple[Settings, Optional[float]]:
    """The settings, or a ConfigError naming the flag; also the split fraction (None with --val)."""
    for flag, value, least in (("--steps", steps, 1), ("--batch-size", batch_size, 1), ("--eval-every", eval_every, 1)):
        if not isinstance(value, int) or value < least:
            raise _config_error(f"{flag} must be an integer of at least {least}; got {value!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise _config_error(f"--lr must be a positive number; got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise _config_error(f"--weight-decay must be a number >= 0; got {weight_decay!r}")
    if warmup_steps is None:
        warmup_steps = steps // 10
    if not isinstance(warmup_steps, int) or not 0 <= warmup_steps < steps:
        raise _config_error(f"--warmup-steps must be an integer from 0 to --steps - 1 ({steps - 1}); "
                            f"got {warmup_steps!r}")
    if decay not in ("cosine", "linear"):
        raise _config_error(f"--decay must be cosine or linear; got {decay!r}")
    if freeze_body and from_scratch:
        raise _config_error("--freeze-body with --from-scratch would train a head on random features; "
                            "choose one")
    if val_path is not None and val_fraction is not None:
        raise _config_error("--val and --val-fraction exclude each other: give a held-out file or a share "
                            "of --train to hold out, not both")
    if val_path is None:
        val_fraction = 0.1 if val_fraction is None else val_fraction
        if not (isinstance(val_fraction, (int, float)) and 0 < val_fraction < 1):
            raise _config_error(f"--val-fraction must be between 0 and 1 (exclusive); got {val_fraction!r}")
    settings = Settings(steps=steps, batch_size=batch_size, lr=float(lr), weight_decay=float(weight_decay),
                        warmup_steps=warmup_steps, decay=decay, eval_every=eval_every,
                        freeze_body=bool(freeze_body), from_scratch=bool(from_scratch), seed=int(seed))
    return settings, val_fraction


def resolve_autocast(requested: str, device):
    """The autocast dtype for ``--dtype`` (None: plain float32). Weights and AdamW stay float32."""
    import torch

    if requested not in ("auto", "fp32", "bf16"):
        raise _config_error(f"--dtype must be auto, fp32 or bf16; got {requested!r}")
    if requested == "fp32":
        return None
    from distlm.checkpoint.pretrained import native_bf16

    native = native_bf16(device)
    if requested == "auto":
        return torch.bfloat16 if native else None
    if device.type == "cuda" and not native:
        major, minor = torch.cuda.get_device_capability(device)
        raise _config_error(f"--dtype bf16: {device} (compute capability {major}.{minor}) has no native bfloat16; "
                            f"use --dtype fp32")
    return torch.bfloat16


# --------------------------------------------------------------------------- fine-tuning


def finetune_classifier(ckpt: str | os.PathLike, train_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                        val_path: str | os.PathLike | None = None, val_fraction: float | None = None,
                        text_field: str = "text", label_field: str = "label", steps: int = 200,
                        batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.01,
                        warmup_steps: int | None = None, decay: str = "cosine", pooling: str = "auto",
                        max_len: int | None = None, freeze_body: bool = False, from_scratch: bool = False,
                        seed: int = 0, device: str = "auto", dtype: str = "auto", tokenizer: str | None = None,
                        eval_every: int = 50, log: Callable[[str], None] = _stderr) -> dict:
    """Fine-tune checkpoint ``ckpt`` as a classifier of ``train_path``; save it to ``out_dir``.

    The keyword arguments are the command's flags. Returns the final metrics: accuracy,
    majority_baseline, val_loss, n_train, n_val, n_classes, labels, steps, out, ...
    """
    settings, val_fraction = check_settings(steps, batch_size, lr, weight_decay, warmup_steps, decay, eval_every,
                                            val_path, val_fraction, freeze_body, from_scratch, seed)
    if pooling not in ("auto", "last", "mean"):
        raise _config_error(f"--pooling must be auto, last or mean; got {pooling!r}")
    out = Path(out_dir)
    check_out_folder(out)

    # The data before torch and the checkpoint: a typo in a JSONL file is reported at once.
    train, val, labels = read_task(train_path, val_path, val_fraction, text_field, label_field, settings.seed)
    val_source = train_path if val_path is None else val_path

    import torch

    from distlm.checkpoint.pretrained import load_pretrained, pick_device
    from distlm.model.classifier import default_pooling

    torch_device = pick_device(device)  # a ConfigError (exit 2) names --device when it cannot be used
    autocast = resolve_autocast(dtype, torch_device)
    pretrained = load_pretrained(ckpt, device="cpu", log=log)
    cfg = pretrained.model.cfg
    max_len = _check_max_len(max_len, cfg.max_seq_len)
    pooling = default_pooling(cfg.objective) if pooling == "auto" else pooling
    tok = _checked_tokenizer(pretrained, tokenizer, cfg.vocab_size)

    train_ids, train_cut = encode_examples(train, tok, max_len, train_path)
    val_ids, val_cut = encode_examples(val, tok, max_len, val_source)
    class_of = {label: i for i, label in enumerate(labels)}
    train_y = [class_of[e.label] for e in train]
    val_y = [class_of[e.label] for e in val]
    baseline = majority_baseline(val_y)
    log(f"classify: {len(train)} training and {len(val)} held-out examples, {len(labels)} classes "
        f"({_counts(train_y, labels)}); {train_cut + val_cut} texts cut to {max_len} tokens; "
        f"majority-class baseline on held-out {baseline:.4f}")

    torch.manual_seed(settings.seed)  # the head and dropout (and the body with --from-scratch)
    model = build_classifier(pretrained, len(labels), pooling, max_len, _pad_id(tok), settings)
    model.to(torch_device)
    log(f"classify: {'random body of the shape of' if settings.from_scratch else 'body from'} {pretrained.folder} "
        f"(step {pretrained.step}), pooling {pooling}, {'head only' if settings.freeze_body else 'body + head'} "
        f"trained on {torch_device}{' in bf16' if autocast else ''}")

    out.mkdir(parents=True, exist_ok=True)
    # An earlier classifier here stops being one now: its classifier.json must never sit next to
    # this run's metrics and weights (a failed or killed run leaves no loadable mix of the two).
    (out / META_FILE).unlink(missing_ok=True)
    metrics = train_classifier(model, train_ids, train_y, val_ids, val_y, settings, torch_device, autocast,
                               baseline, out / METRICS_FILE, log)

    meta = {
        "format": FORMAT, "version": FORMAT_VERSION,
        "source": {"checkpoint": str(pretrained.folder), "step": pretrained.step,
                   "from_scratch": settings.from_scratch},
        "labels": labels, "pooling": pooling, "max_len": max_len, "pad_id": model.pad_id,
        "head_dropout": HEAD_DROPOUT, "model": _model_dict(cfg), "tokenizer": TOKENIZER_FILE,
        "data": {"train": str(train_path), "val": None if val_path is None else str(val_path),
                 "val_fraction": val_fraction, "text_field": text_field, "label_field": label_field,
                 "n_train": len(train), "n_val": len(val), "truncated": train_cut + val_cut},
        "training": {**vars(settings), "grad_clip": GRAD_CLIP, "device": str(torch_device),
                     "dtype": "bf16" if autocast else "fp32"},
        "metrics": metrics,
    }
    save_classifier(out, model, tok, meta)
    log(f"classify: saved {out / WEIGHTS_FILE}, {out / META_FILE}")
    return {"accuracy": metrics["accuracy"], "majority_baseline": baseline, "val_loss": metrics["val_loss"],
            "n_train": len(train), "n_val": len(val), "n_classes": len(labels), "labels": labels,
            "steps": settings.steps, "out": str(out), "from_scratch": settings.from_scratch,
            "checkpoint": str(pretrained.folder), "checkpoint_step": pretrained.step,
            "per_class_accuracy": metrics["per_class_accuracy"]}


OUT_FILES = (WEIGHTS_FILE, META_FILE, TOKENIZER_FILE, METRICS_FILE)


def check_out_folder(out: Path) -> None:
    """``--out`` must be new, empty, or a classifier folder (which is then replaced): never a run,
    checkpoint or data folder whose metrics.jsonl or tokenizer.json the classifier's would overwrite."""
    if not out.exists():
        return
    if not out.is_dir():
        raise _config_error(f"--out {out} exists and is not a folder; name a folder to write the classifier into")
    ours = set(OUT_FILES) | {name + ".tmp" for name in OUT_FILES} | {TOKENIZER_FILE + ".save.tmp",
                                                                   TOKENIZER_FILE + ".save.tmp.tmp"}
    foreign = sorted(entry.name for entry in out.iterdir() if entry.name not in ours)
    if foreign:
        raise _config_error(f"--out {out} holds {', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}: it "
                            f"is not a classifier folder (one written by distlm finetune-classify, which is "
                            f"replaced); name a new or empty folder")


def read_task(train_path, val_path, val_fraction: Optional[float], text_field: str, label_field: str,
              seed: int) -> tuple[list[Example], list[Example], list[str]]:
    """(training examples, held-out examples, labels in class-id order) of the task's files."""
    train = read_examples(train_path, text_field, label_field, "--train")
    labels = class_labels(train, train_path)
    if val_path is not None:
        val = read_examples(val_path, text_field, label_field, "--val")
        check_val_labels(val, labels, val_path)
        return train, val, labels
    kept, val = split_examples(train, val_fraction, seed)
    if not val:
        raise _input_error(f"--train {train_path}: --val-fraction {val_fraction} of {len(train)} examples "
                           f"holds none out; raise --val-fraction or give --val")
    return kept, val, labels


def _check_max_len(max_len: Optional[int], model_max: int) -> int:
    if max_len is None:
        return model_max
    if not isinstance(max_len, int) or not 1 <= max_len <= model_max:
        raise _config_error(f"--max-len must be from 1 to the model's max_seq_len ({model_max}); got {max_len!r}")
    return max_len


def _checked_tokenizer(pretrained, override: Optional[str], vocab_size: int):
    """The checkpoint's tokenizer; one with ids past the model's token table cannot be used."""
    tok = pretrained.tokenizer(override)
    if tok.vocab_size > vocab_size:
        message = (f"the tokenizer has {tok.vocab_size} tokens but the model's table only {vocab_size}: "
                   f"it is not the tokenizer this model was trained with")
        if override:
            raise _config_error(f"--tokenizer {override}: {message}")
        from distlm.checkpoint.errors import CheckpointError

        raise CheckpointError(f"{pretrained.folder}: {message}; pass --tokenizer FILE")
    return tok


def _pad_id(tokenizer) -> int:
    # Any id works (padding is masked out); the tokenizer's own pad or EOS id reads best in a dump.
    for pad in (getattr(tokenizer, "pad_id", None), getattr(tokenizer, "eos_id", None)):
        if pad is not None:
            return int(pad)
    return 0


def _model_dict(cfg) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def _counts(targets: Sequence[int], labels: Sequence[str]) -> str:
    counts = Counter(targets)
    return ", ".join(f"{labels[i]!r}: {counts[i]}" for i in range(len(labels)))


def build_classifier(pretrained, n_classes: int, pooling: str, max_len: int, pad_id: int, settings: Settings):
    """The classifier on the pretrained body (or a fresh one of its shape), in train mode."""
    from distlm.model import Transformer
    from distlm.model.classifier import SequenceClassifier

    body = pretrained.model
    if settings.from_scratch:
        body = Transformer(body.cfg, seed=settings.seed)
    model = SequenceClassifier(body, n_classes, pooling, max_len, pad_id, dropout=HEAD_DROPOUT)
    if settings.freeze_body:
        for p in model.body.parameters():
            p.requires_grad_(False)
    return model.train()


class BatchOrder:
    """Batches of example indices: a fresh seeded permutation each pass over the data, cut into
    batches (a short tail is dropped), so the order is a function of the seed only."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size = n, min(batch_size, n)
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def next(self) -> list[int]:
        if len(self.order) < self.batch_size:
            self.order = list(range(self.n))
            self.rng.shuffle(self.order)
        batch, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
        return batch


def train_classifier(model, train_ids, train_y, val_ids, val_y, settings: Settings, device, autocast, baseline: float,
                     metrics_path: Path, log: Callable[[str], None]) -> dict:
    """Fine-tune ``model`` in place; evaluate every ``eval_every`` steps and at the end.

    Each evaluation is logged and appended to ``metrics_path`` (rewritten from scratch, so it
    holds this run only). Returns the last evaluation.
    """
    import torch
    import torch.nn.functional as F

    from distlm.config import OptimConfig
    from distlm.model.classifier import pad_batch
    from distlm.model.transformer import parameter_groups
    from distlm.train.schedule import learning_rate

    schedule = OptimConfig(lr=settings.lr, min_lr=0.0, warmup_steps=settings.warmup_steps, decay=settings.decay)
    groups = parameter_groups(model, settings.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.999), eps=1e-8)
    trainable = [p for g in groups for p in g["params"]]
    batches = BatchOrder(len(train_ids), settings.batch_size, settings.seed)
    targets = torch.tensor(train_y, dtype=torch.long)
    started, losses, last = time.time(), [], {}
    metrics_path.write_text("")
    model.train()
    for step in range(settings.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, schedule, settings.steps)
        index = batches.next()
        tokens, keep = pad_batch([train_ids[i] for i in index], model.pad_id, device)
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            logits = model(tokens, keep)
        loss = F.cross_entropy(logits, targets[index].to(device))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the training loss is {loss.item()} at step {step + 1}; lower --lr "
                                     f"(now {settings.lr:g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, GRAD_CLIP)
        optimizer.step()
        losses.append(loss.item())
        done = step + 1
        if done % settings.eval_every == 0 or done == settings.steps:
            last = evaluate(model, val_ids, val_y, device, autocast, batch_size=max(64, settings.batch_size))
            last = {"step": done, "train_loss": sum(losses) / len(losses), **last, "majority_baseline": baseline,
                    "lr": optimizer.param_groups[0]["lr"], "elapsed_s": round(time.time() - started, 3)}
            losses = []
            with open(metrics_path, "a") as f:
                f.write(json.dumps(last) + "\n")
            log(f"step {done}/{settings.steps}  loss {last['train_loss']:.4f}  held-out accuracy "
                f"{last['accuracy']:.4f} (majority baseline {baseline:.4f})  held-out loss {last['val_loss']:.4f}  "
                f"{last['elapsed_s']:.1f} s")
    model.eval()
    return last


def class_logits(model, ids: Sequence[Sequence[int]], device, autocast=None, batch_size: int = 64):
    """Logits [N, n_classes] (float32, on the CPU) of encoded texts, in eval mode, batch by batch."""
    import torch

    from distlm.model.classifier import pad_batch

    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            tokens, keep = pad_batch(list(ids[start:start + batch_size]), model.pad_id, device)
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                out.append(model(tokens, keep).float().cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, model.n_classes)


def evaluate(model, ids, targets: Sequence[int], device, autocast=None, batch_size: int = 64) -> dict:
    """Held-out accuracy, mean cross-entropy and per-class accuracy (recall)."""
    import torch
    import torch.nn.functional as F

    logits = class_logits(model, ids, device, autocast, batch_size)
    y = torch.tensor(list(targets), dtype=torch.long)
    right = logits.argmax(dim=1) == y
    per_class = [round(right[y == c].sum().item() / (y == c).sum().item(), 4) if (y == c).any() else None
                 for c in range(logits.shape[1])]
    return {"accuracy": right.sum().item() / max(1, len(y)), "val_loss": F.cross_entropy(logits, y).item(),
            "per_class_accuracy": per_class}


# --------------------------------------------------------------------------- saving and loading


def save_classifier(out: Path, model, tokenizer, meta: dict) -> None:
    """Weights, tokenizer, then classifier.json, each written to a temporary file and renamed, so a
    reader never sees a torn file; classifier.json comes last as the mark of a finished save."""
    from safetensors.torch import save

    from distlm.fsutil import atomic_write_bytes, atomic_write_text

    tensors, seen = {}, set()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors that share memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        tensors[name] = t
    atomic_write_bytes(out / WEIGHTS_FILE, save(tensors, metadata={"format": "pt", "distlm": FORMAT}))
    tmp = out / (TOKENIZER_FILE + ".save.tmp")
    tokenizer.save(tmp)
    os.replace(tmp, out / TOKENIZER_FILE)
    atomic_write_text(out / META_FILE, json.dumps(meta, indent=2) + "\n")


def load_classifier(out_dir: str | os.PathLike, device: str = "cpu"):
    """``(model, labels, tokenizer)`` of a folder written by :func:`finetune_classifier`.

    ``model`` is a :class:`~distlm.model.classifier.SequenceClassifier` in eval mode; class id
    ``i`` is ``labels[i]``. Use :func:`predict` to classify texts.
    """
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from distlm.checkpoint.errors import CheckpointError
    from distlm.checkpoint.pretrained import _materialize_buffers
    from distlm.config import ModelConfig
    from distlm.data.tokenizers import load_tokenizer
    from distlm.model import Transformer
    from distlm.model.classifier import SequenceClassifier

    folder = Path(out_dir)
    try:
        meta = json.loads((folder / META_FILE).read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"{META_FILE} holds a JSON {type(meta).__name__}, not an object")
        if meta.get("format") != FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        if meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"format version {meta.get('version')!r}; this distlm reads version {FORMAT_VERSION}")
        cfg = ModelConfig(**meta["model"])
        labels = [str(label) for label in meta["labels"]]
        with torch.device("meta"):
            body = Transformer(cfg, seed=0)
            model = SequenceClassifier(body, len(labels), meta["pooling"], int(meta["max_len"]),
                                       int(meta["pad_id"]), dropout=meta.get("head_dropout", HEAD_DROPOUT))
        state = load_file(str(folder / WEIGHTS_FILE), device="cpu")
        tokenizer_name = str(meta.get("tokenizer", TOKENIZER_FILE))
        if Path(tokenizer_name).name != tokenizer_name:  # the folder's own file, never one elsewhere
            raise ValueError(f"tokenizer {tokenizer_name!r} is not a file name in the folder")
        tokenizer = load_tokenizer(folder / tokenizer_name)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise CheckpointError(f"{folder}: not a readable classifier folder ({type(e).__name__}: {e}); "
                              f"it is written by distlm finetune-classify") from None
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:  # a tensor of another shape than classifier.json's model and labels give
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: the weights do not fit {META_FILE}: {e}") from None
    if missing or unexpected:
        raise CheckpointError(f"{folder / WEIGHTS_FILE}: the weights do not fit {META_FILE} "
                              f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    _materialize_buffers(model.body, cfg)
    return model.to(device).eval(), labels, tokenizer


def predict(model, tokenizer, texts: Sequence[str], batch_size: int = 64) -> list[int]:
    """The class id of each text (``labels[id]`` is its label), encoded as in training: cut to the
    model's ``max_len`` tokens. Raises ValueError for a text the tokenizer cannot encode."""
    ids = []
    for text in texts:
        encoded = [int(i) for i in tokenizer.encode(text)][:model.max_len]
        if not encoded:
            raise ValueError(f"text {text[:40]!r} encodes to no tokens")
        ids.append(encoded)
    device = next(model.parameters()).device
    return class_logits(model, ids, device, batch_size=batch_size).argmax(dim=1).tolist()
