"""``distlm eval``: loss, perplexity and bits per byte of a checkpoint on shards or a text file."""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest

from helpers import ROOT, SHARED_DATA, distlm_command, read_metrics, run_distlm

from distlm.cli import main
from distlm.data.tokenizers import ByteTokenizer, CharTokenizer
from distlm.tasks.eval_lm import evaluate_checkpoint, target_bytes, text_rows

MULTIBYTE = "héllo wörld ☃"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the models are tiny, and on a busy 2-core machine a second thread makes
    every operation wait for the scheduler (ten times slower)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def evaluate(ckpt, data, **options):
    return evaluate_checkpoint(ckpt, data, device="cpu", **options)


def logged_val_loss(run_dir: Path, step: int) -> float:
    return next(r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r and r["step"] == step)


def shakespeare_text(chars: int) -> str:
    return (SHARED_DATA / "tinyshakespeare.txt").read_text(encoding="utf-8")[:chars]


# ------------------------------------------------------------------------- causal, char-level


def test_reproduces_the_runs_validation_loss_then_reads_the_whole_split(char_checkpoint, shakespeare_char):
    # The run validated on eval_iters 8 x batch_size 16 = 128 rows from the start of val: the same
    # rows and weights give the same loss.
    first = evaluate(char_checkpoint, shakespeare_char, batch_size=16, max_batches=8)
    assert first["rows"] == 128 and not first["complete"]
    assert first["loss"] == pytest.approx(logged_val_loss(char_checkpoint, first["step"]), abs=1e-5)

    # The whole split, in batches that do not divide it: every row once, token-weighted.
    whole = evaluate(char_checkpoint, shakespeare_char, batch_size=15)
    val_rows = json.loads((shakespeare_char / "manifest.json").read_text())["splits"]["val"]["rows"]
    assert whole["complete"] and whole["rows"] == whole["rows_total"] == val_rows
    assert whole["tokens"] == val_rows * 64
    assert whole["tokens"] == whole["bytes"]  # one ASCII character, one byte
    assert abs(whole["loss"] - first["loss"]) < 0.15
    assert whole["perplexity"] == pytest.approx(math.exp(whole["loss"]), rel=1e-12)
    assert whole["bits_per_byte"] * math.log(2) == pytest.approx(whole["loss"] * whole["tokens"] / whole["bytes"],
                                                                  rel=1e-12)
    assert whole["loss"] < 3.0  # well below the 4.2 nats of a uniform guess over 66 ids


def test_a_text_file_scores_as_the_shards_prepared_from_it(char_checkpoint, shakespeare_char, tmp_path):
    from distlm.data.prepare import prepare_corpus

    text = tmp_path / "sample.txt"
    text.write_text(shakespeare_text(4000), encoding="utf-8")
    shards = tmp_path / "shards"
    prepare_corpus([str(text)], str(shards), tokenizer=str(shakespeare_char / "tokenizer.json"), seq_len=64,
                   val_fraction=0, block_rows=16, workers=1, log=lambda *_: None)
    # 4000 characters + EOS: prepare keeps 62 full rows and drops the tail; the text keeps it.
    assert text_rows(4001, 64) == 63

    same_rows = dict(batch_size=8, max_batches=62 // 8)
    from_text = evaluate(char_checkpoint, text, **same_rows)
    from_shards = evaluate(char_checkpoint, shards, split="train", **same_rows)
    assert from_text["tokens"] == from_shards["tokens"] == 56 * 64
    assert from_text["loss"] == pytest.approx(from_shards["loss"], abs=1e-6)

    all_text = evaluate(char_checkpoint, text, batch_size=8)
    all_shards = evaluate(char_checkpoint, shards, split="train", batch_size=8)
    assert all_text["split"] is None and all_text["rows"] == 63
    assert all_text["tokens"] == 4000  # every token but the first, the closing EOS included
    assert all_shards["tokens"] == 62 * 64
    assert all_text["loss"] == pytest.approx(all_shards["loss"], abs=0.02)


# ------------------------------------------------------------------------- bytes


def test_byte_count_is_the_same_whatever_the_tokenizer():
    byte, char = ByteTokenizer(), CharTokenizer.fit([MULTIBYTE])
    expected = len(MULTIBYTE.encode("utf-8"))
    assert expected == 17 and len(MULTIBYTE) == 13
    by_bytes, by_chars = byte.encode(MULTIBYTE).astype(int), char.encode(MULTIBYTE).astype(int)
    assert target_bytes(byte, [by_bytes]) == target_bytes(char, [by_chars]) == expected
    # EOS stands for the "\n" between documents; -100 (padding, unscored) counts nothing.
    assert target_bytes(byte, [[*by_bytes, byte.eos_id, -100]]) == expected + 1
    assert target_bytes(char, [[*by_chars, char.eos_id, -100, -100]]) == expected + 1
    # Rows cut inside a character: exact for these tokenizers, counted token by token.
    assert target_bytes(byte, [by_bytes[:2], by_bytes[2:]]) == expected

    class Decoding:  # any other tokenizer (BPE, SentencePiece): each row's targets decoded
        name, eos_id = "hf", byte.eos_id

        def decode(self, ids, eos_text=""):
            return byte.decode(ids, eos_text=eos_text)

    assert target_bytes(Decoding(), [[*by_bytes, byte.eos_id, -100]]) == expected + 1


def test_byte_level_bpe_counts_every_byte_once_however_the_targets_are_cut(tmp_path):
    """A byte-level BPE splits a rare character over tokens: rows cut between them, and a masked
    LM's scattered targets, must still add up to the text's bytes (decoding a partial character
    alone would count a 3-byte U+FFFD instead)."""
    import random

    import numpy as np

    from distlm.data.tokenizer_train import train_bpe
    from distlm.data.tokenizers import load_tokenizer

    rng = random.Random(0)
    # Rare CJK characters (3 bytes each, seldom merged) among ASCII words.
    text = "".join(chr(rng.randint(0x4E00, 0x9FFF)) if rng.random() < 0.3 else rng.choice("ab cd") for _ in range(600))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    train_bpe([corpus], tmp_path / "bpe.json", 300, log=lambda *_: None)
    bpe = load_tokenizer(tmp_path / "bpe.json")
    ids = np.append(bpe.encode(text).astype(np.int64), bpe.eos_id)
    total = len(text.encode("utf-8")) + 1  # and EOS as one byte
    assert len(ids) > len(text) // 2  # many characters span several tokens
    assert target_bytes(bpe, [ids]) == total
    assert target_bytes(bpe, [ids[i:i + 7] for i in range(0, len(ids), 7)]) == total  # rows of 7 tokens
    chosen = np.random.default_rng(0).random(len(ids)) < 0.15  # the targets a masked LM scores, and the rest
    assert target_bytes(bpe, [np.where(chosen, ids, -100)]) + target_bytes(bpe, [np.where(chosen, -100, ids)]) == total
    for special in (bpe.bos_id, bpe.pad_id, bpe.mask_id):
        assert target_bytes(bpe, [[special]]) == 0


def test_a_tiny_or_empty_text(char_checkpoint, tmp_path):
    from distlm.data.inputs import InputError

    short = tmp_path / "short.txt"
    short.write_text("To be", encoding="utf-8")  # one row, mostly padding: 5 characters + EOS, 5 predicted
    result = evaluate(char_checkpoint, short)
    assert (result["rows"], result["tokens"], result["bytes"]) == (1, 5, 5)
    assert math.isfinite(result["loss"]) and result["complete"]
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(InputError, match="1 token.*empty text"):
        evaluate(char_checkpoint, empty)


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory):
    """A few KB of Shakespeare with multi-byte characters, as byte-level shards (rows of 32)."""
    from distlm.data.prepare import prepare_corpus

    root = tmp_path_factory.mktemp("eval-bytes")
    lines = shakespeare_text(6000).splitlines()
    text = root / "bytes.txt"
    text.write_text("\n".join(line + (f" {MULTIBYTE}" if i % 5 == 0 else "") for i, line in enumerate(lines)),
                    encoding="utf-8")
    prepare_corpus([str(text)], str(root / "shards"), tokenizer="byte", seq_len=32, val_fraction=0.2,
                   block_rows=16, workers=1, log=lambda *_: None)
    return text, root / "shards"


def train_tiny(run_dir: Path, data: Path, *overrides: str) -> Path:
    """Two steps of a one-layer model: untrained, but a real checkpoint and a logged val loss."""
    run_distlm(["train", str(ROOT / "configs" / "tiny-test.yaml"), f"data.path={data}", f"run.dir={run_dir}",
                "model.n_layers=1", "train.max_steps=2", "train.batch_size=4", "train.eval_iters=3",
                *overrides], timeout=120)
    return run_dir


def test_bits_per_byte_of_a_byte_level_model_is_its_loss(byte_data, tmp_path):
    text, shards = byte_data
    # Trained from data.sources (not data.path): the text's tokenizer is found through them too.
    run_dir = train_tiny(tmp_path / "run", shards, "data.path=null", f"data.sources=[{{path: {shards}}}]")
    result = evaluate(run_dir, text, batch_size=16)
    n_bytes = len(text.read_bytes())
    assert any(ord(c) > 127 for c in text.read_text(encoding="utf-8"))
    # Every byte is predicted once (the first is not, the closing EOS is, as one byte).
    assert result["tokens"] == result["bytes"] == n_bytes
    assert result["bits_per_byte"] * math.log(2) == pytest.approx(result["loss"], rel=1e-12)
    shard_result = evaluate(run_dir, shards, batch_size=4, max_batches=3)
    assert shard_result["loss"] == pytest.approx(logged_val_loss(run_dir, 2), abs=1e-5)


def test_masked_lm_scores_the_masks_its_validation_used(byte_data, tmp_path):
    text, shards = byte_data
    run_dir = train_tiny(tmp_path / "mlm", shards, "model.objective=mlm")
    # The run's validation loss is a mean of 3 batch means (4 rows each); the masked-token counts
    # differ per batch, so rebuild it from each batch's own mean.
    means, before = [], (0.0, 0)
    for k in (1, 2, 3):
        r = evaluate(run_dir, shards, batch_size=4, max_batches=k)
        nats = r["loss"] * r["tokens"]
        means.append((nats - before[0]) / (r["tokens"] - before[1]))
        before = (nats, r["tokens"])
    assert sum(means) / 3 == pytest.approx(logged_val_loss(run_dir, 2), abs=1e-5)
    assert 0.0 <= r["masked_accuracy"] <= 1.0
    assert r["bits_per_byte"] * math.log(2) == pytest.approx(r["loss"], rel=1e-12)  # a byte per masked token
    # About mask_prob of the tokens are scored; the same seed masks the same ones every time.
    whole = evaluate(run_dir, text, batch_size=16)
    assert 0.10 < whole["tokens"] / len(text.read_bytes()) < 0.20
    again = evaluate(run_dir, text, batch_size=7)
    assert (again["tokens"], again["masked_accuracy"]) == (whole["tokens"], whole["masked_accuracy"])
    assert again["loss"] == pytest.approx(whole["loss"], rel=1e-6)


# ------------------------------------------------------------------------- the command


def test_json_through_the_cli(char_checkpoint, shakespeare_char):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(distlm_command(["eval", str(char_checkpoint), "--data", str(shakespeare_char), "--json",
                                          "--max-batches", "2", "--device", "cpu", "--threads", "1"]),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "checkpoint", "step", "data",
            "split"} <= set(result)
    assert result["split"] == "val" and result["tokens"] == 2 * 16 * 64 and result["step"] == 300


def test_errors_name_the_problem(char_checkpoint, tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["eval", str(char_checkpoint), "--data", str(missing), "--device", "cpu"]) == 3
    assert str(missing) in capsys.readouterr().err

    assert main(["eval", str(tmp_path / "no-run"), "--data", str(tmp_path), "--device", "cpu"]) == 4
    assert "no such checkpoint" in capsys.readouterr().err


def test_a_missing_split_lists_the_splits(char_checkpoint, shakespeare_char, capsys):
    code = main(["eval", str(char_checkpoint), "--data", str(shakespeare_char), "--split", "test",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 3
    assert "no split 'test'" in err and "train, val" in err and "--split" in err
