import gzip
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import zstandard as zstd
from hypothesis import event, given, settings
from hypothesis import strategies as st

from distlm.data.inputs import InputError
from distlm.data.prepare import PrepareError, prepare_corpus
from distlm.data.shards import iter_shard_blocks, load_manifest
from distlm.data.tokenizers import ByteTokenizer, CharTokenizer, load_tokenizer

from helpers import ROOT

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


def quiet(_msg):
    pass


def split_rows(out, split):
    m = load_manifest(out)
    blocks = []
    for shard in m.split(split).shards:
        for _, rows in iter_shard_blocks(m.shard_path(shard), dtype=m.np_dtype, row_len=m.row_len,
                                         block_rows=shard.block_rows):
            blocks.append(rows)
    return np.concatenate(blocks)


def unoverlap(rows):
    """Rows overlap by one token; the stream they cover is row 0 then rows[1:] minus their first token."""
    return np.concatenate([rows[0], rows[1:, 1:].reshape(-1)]).astype(np.int64)


def expected_stream(tok, docs):
    parts = []
    for d in docs:
        parts += [tok.encode(d).astype(np.int64), [tok.eos_id]]
    return np.concatenate(parts)


def check_dataset(out, tok, docs, seq_len):
    """Both splits, un-overlapped, are the tokenized docs (EOS after each) minus dropped tails."""
    m = load_manifest(out)
    stream = expected_stream(tok, docs)
    assert m.source["tokens"] == len(stream) and m.source["documents"] == len(docs)
    n_train = m.split("train").tokens
    parts = {"train": stream[:n_train], "val": stream[n_train:]}
    assert sum(s.tokens for s in m.splits.values()) == len(stream)
    for name, split in m.splits.items():
        part = parts[name]
        rows = split_rows(out, name)
        assert rows.shape == (split.rows, seq_len + 1)
        assert split.rows == (len(part) - 1) // seq_len
        covered = split.rows * seq_len + 1
        assert split.dropped_tokens == len(part) - covered
        np.testing.assert_array_equal(unoverlap(rows), part[:covered])
    return m


def test_text_files_byte_round_trip(tmp_path):
    docs = ["First document, with ünïcödé ✓.\n", "second\r\nline\n" * 40, "🙂" * 30]
    for i, d in enumerate(docs):
        (tmp_path / f"doc{i}.txt").write_bytes(d.encode("utf-8"))
    out = tmp_path / "out"
    logs = []
    m = prepare_corpus([str(tmp_path / f"doc{i}.txt") for i in range(3)], str(out), seq_len=16,
                       val_fraction=0.1, block_rows=3, shard_mb=0.004, log=logs.append)
    check_dataset(out, ByteTokenizer(), docs, 16)
    assert m == json.loads((out / "manifest.json").read_text())
    assert m["dtype"] == "uint16" and m["vocab_size"] == 257 and m["row_len"] == 17
    assert load_tokenizer(out) == ByteTokenizer()
    assert len(m["splits"]["train"]["shards"]) > 1  # rolled over
    assert all(max(s["block_rows"]) <= 3 for s in m["splits"]["train"]["shards"])
    assert any(line.startswith("prepared ") and "MB/s" in line for line in logs)
    assert not list(out.glob("*.tmp"))


def test_val_split_is_the_tail(tmp_path):
    text = "".join(chr(ord("a") + i % 26) for i in range(2000))
    (tmp_path / "a.txt").write_text(text)
    out = tmp_path / "out"
    m = prepare_corpus([str(tmp_path / "a.txt")], str(out), seq_len=10, val_fraction=0.1, log=quiet)
    total = len(text) + 1
    assert m["splits"]["val"]["tokens"] == round(total * 0.1)
    val = unoverlap(split_rows(out, "val"))
    n_train = m["splits"]["train"]["tokens"]
    stream = expected_stream(ByteTokenizer(), [text])
    np.testing.assert_array_equal(val, stream[n_train:n_train + len(val)])


def test_char_tokenizer_is_fitted_and_saved(tmp_path):
    docs = ["to be or not to be\n" * 20, "that is the question\n" * 20]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    out = tmp_path / "out"
    m = prepare_corpus([str(tmp_path / "0.txt"), str(tmp_path / "1.txt")], str(out), tokenizer="char",
                       seq_len=7, val_fraction=0.05, log=quiet)
    tok = load_tokenizer(out)
    assert isinstance(tok, CharTokenizer) and tok.chars == sorted(set("".join(docs)))
    assert m["vocab_size"] == tok.vocab_size and m["tokenizer"] == tok.to_dict()
    check_dataset(out, tok, docs, 7)

    # Reusing that tokenizer file on text with new characters is refused up front.
    (tmp_path / "new.txt").write_text("XYZ" * 50)
    with pytest.raises(PrepareError, match="not in the given char tokenizer"):
        prepare_corpus([str(tmp_path / "new.txt")], str(tmp_path / "out2"), tokenizer=str(out / "tokenizer.json"),
                       seq_len=4, log=quiet)


def test_large_vocab_is_stored_as_uint32(tmp_path):
    chars = [chr(c) for c in range(0x4E00, 0x4E00 + 70000) if not 0xD800 <= c <= 0xDFFF]
    text = "".join(chars)
    (tmp_path / "big.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    m = prepare_corpus([str(tmp_path / "big.txt")], str(out), tokenizer="char", seq_len=64,
                       val_fraction=0.01, log=quiet)
    assert m["dtype"] == "uint32" and m["vocab_size"] == len(chars) + 1
    check_dataset(out, load_tokenizer(out), [text], 64)


def _jsonl(records):
    return "".join(json.dumps(r) + "\n" for r in records).encode("utf-8")


def test_jsonl_and_jsonl_zst(tmp_path):
    recs_a = [{"text": f"record {i} " + "x" * i, "id": i} for i in range(30)]
    recs_b = [{"body": "zstd ✓ " * (i + 1)} for i in range(20)]
    (tmp_path / "a.jsonl").write_bytes(_jsonl(recs_a[:10]) + b"\n   \n" + _jsonl(recs_a[10:]))
    raw_b = _jsonl(recs_b)
    cctx = zstd.ZstdCompressor()
    # Two concatenated frames, as produced by appending to a .zst file.
    (tmp_path / "b.jsonl.zst").write_bytes(cctx.compress(raw_b[:500]) + cctx.compress(raw_b[500:]))
    out = tmp_path / "out"
    prepare_corpus([str(tmp_path / "a.jsonl")], str(out), seq_len=8, val_fraction=0.1, log=quiet)
    check_dataset(out, ByteTokenizer(), [r["text"] for r in recs_a], 8)
    out2 = tmp_path / "out2"
    prepare_corpus([str(tmp_path / "b.jsonl.zst")], str(out2), seq_len=8, val_fraction=0.1,
                   text_field="body", log=quiet)
    check_dataset(out2, ByteTokenizer(), [r["body"] for r in recs_b], 8)


def test_jsonl_errors_name_file_and_line(tmp_path):
    good = _jsonl([{"text": "ok " * 20}] * 3)
    (tmp_path / "bad.jsonl").write_bytes(good + b'{"text": "unterminated\n')
    with pytest.raises(InputError, match=r"bad\.jsonl:4: invalid JSON"):
        prepare_corpus([str(tmp_path / "bad.jsonl")], str(tmp_path / "o1"), seq_len=4, log=quiet)
    (tmp_path / "nofield.jsonl").write_bytes(good + _jsonl([{"content": "x"}]))
    with pytest.raises(InputError, match=r"nofield\.jsonl:4: no field 'text' \(fields: content\).*--text-field"):
        prepare_corpus([str(tmp_path / "nofield.jsonl")], str(tmp_path / "o2"), seq_len=4, log=quiet)
    (tmp_path / "cut.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(good * 50)[:-6])
    with pytest.raises(InputError, match=r"cut\.jsonl\.zst.*truncated"):
        prepare_corpus([str(tmp_path / "cut.jsonl.zst")], str(tmp_path / "o3"), seq_len=4, log=quiet)


def test_directory_walk_skips_binary_hidden_and_pycache(tmp_path):
    src = tmp_path / "src"
    (src / "b" / "__pycache__").mkdir(parents=True)
    (src / "a").mkdir()
    (src / ".git").mkdir()
    (src / "a" / "2.txt").write_text("second file " * 10)
    (src / "a" / "1.txt").write_text("first file " * 10)
    (src / "b" / "3.md").write_text("third file " * 10)
    (src / "b" / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 20)
    (src / "b" / "__pycache__" / "x.pyc").write_text("never read")
    (src / ".hidden.txt").write_text("never read")
    (src / ".git" / "HEAD").write_text("never read")
    (src / "z.txt").write_text("last file " * 10)
    logs = []
    out = src / "prepared"  # inside an input folder: must not read itself
    m = prepare_corpus([str(src)], str(out), seq_len=8, val_fraction=0.1, log=logs.append)
    docs = ["first file " * 10, "second file " * 10, "third file " * 10, "last file " * 10]
    check_dataset(out, ByteTokenizer(), docs, 8)
    assert m["source"]["skipped_files"] == 1 and m["source"]["documents"] == 4
    skipped = [line for line in logs if line.startswith("skipping")]
    assert len(skipped) == 1 and "image.png" in skipped[0] and "UTF-8" in skipped[0]


def test_error_messages(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 20)  # 241 tokens with EOS
    a = str(tmp_path / "a.txt")
    with pytest.raises(InputError, match=r"input .*missing\.txt does not exist"):
        prepare_corpus([a, str(tmp_path / "missing.txt")], str(tmp_path / "o"), log=quiet)
    with pytest.raises(PrepareError, match="no input files found"):
        (tmp_path / "empty").mkdir()
        prepare_corpus([str(tmp_path / "empty")], str(tmp_path / "o"), log=quiet)
    with pytest.raises(PrepareError, match="seq_len must be >= 1"):
        prepare_corpus([a], str(tmp_path / "o"), seq_len=0, log=quiet)
    for bad in (1.0, -0.1):
        with pytest.raises(PrepareError, match=r"val_fraction must be in \[0, 1\)"):
            prepare_corpus([a], str(tmp_path / "o"), val_fraction=bad, log=quiet)
    too_small = r"the val split has 2 tokens but one row needs seq_len \+ 1 = 9.*--val-fraction"
    with pytest.raises(PrepareError, match=too_small):
        prepare_corpus([a], str(tmp_path / "o"), seq_len=8, val_fraction=0.01, log=quiet)
    with pytest.raises(PrepareError, match=r"the train split has 241 tokens but one row needs seq_len \+ 1 = 1,025"):
        prepare_corpus([a], str(tmp_path / "o"), seq_len=1024, val_fraction=0, log=quiet)
    with pytest.raises(PrepareError, match="unknown tokenizer .bpe."):
        prepare_corpus([a], str(tmp_path / "o"), tokenizer="bpe", log=quiet)
    assert not (tmp_path / "o").exists()  # nothing written by refused runs

    m = prepare_corpus([a], str(tmp_path / "o"), seq_len=8, val_fraction=0, log=quiet)
    assert list(m["splits"]) == ["train"]
    with pytest.raises(PrepareError, match=r"already holds a prepared dataset.*pick another --out or delete"):
        prepare_corpus([a], str(tmp_path / "o"), seq_len=8, log=quiet)


def test_shard_named_files_without_prepare_state_are_refused_not_deleted(tmp_path):
    """Without a work folder nothing proves those files came from a prepare: they are kept."""
    (tmp_path / "a.txt").write_text("abc " * 100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000007.tar").write_bytes(b"stale")
    (out / "train-000000.tar.tmp").write_bytes(b"stale")
    (out / "notes.txt").write_text("user file")
    with pytest.raises(PrepareError, match=r"already holds train-000000.tar.tmp, train-000007.tar"):
        prepare_corpus([str(tmp_path / "a.txt")], str(out), seq_len=8, val_fraction=0.1, log=quiet)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train-000000.tar.tmp", "train-000007.tar"]
    (out / "train-000007.tar").unlink()
    (out / "train-000000.tar.tmp").unlink()
    prepare_corpus([str(tmp_path / "a.txt")], str(out), seq_len=8, val_fraction=0.1, log=quiet)
    assert (out / "notes.txt").read_text() == "user file" and (out / "manifest.json").is_file()


@settings(max_examples=20, deadline=None)
@given(
    docs=st.lists(st.text(min_size=0, max_size=80), min_size=2, max_size=6),
    seq_len=st.integers(1, 9),
    val_fraction=st.sampled_from([0.0, 0.15, 0.3]),
    block_rows=st.integers(1, 4),
    tokenizer=st.sampled_from(["byte", "char"]),
)
def test_prepare_reproduces_token_stream_property(docs, seq_len, val_fraction, block_rows, tokenizer):
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        paths = []
        for i, doc in enumerate(docs):
            p = d / f"{i:02d}.txt"
            p.write_bytes(doc.encode("utf-8"))
            paths.append(str(p))
        try:
            prepare_corpus(paths, str(d / "out"), tokenizer=tokenizer, seq_len=seq_len,
                           val_fraction=val_fraction, block_rows=block_rows, shard_mb=0.002, log=quiet)
        except PrepareError as exc:
            assert "split has" in str(exc) or "no text found" in str(exc)
            event("too small to prepare")
            return
        tok = load_tokenizer(d / "out")
        check_dataset(d / "out", tok, docs, seq_len)


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="tiny Shakespeare not available")
def test_tiny_shakespeare_char(tmp_path):
    out = tmp_path / "out"
    m = prepare_corpus([str(SHAKESPEARE)], str(out), tokenizer="char", seq_len=256, log=quiet)
    assert m["vocab_size"] == 66
    text = SHAKESPEARE.read_text(encoding="utf-8")
    check_dataset(out, load_tokenizer(out), [text], 256)


@pytest.mark.parametrize("stride, block_rows", [(1, 7), (3, 5), (8, 2), (8, None)])
def test_stride_writes_every_window_of_the_training_stream(tmp_path, stride, block_rows):
    text = "the quick brown fox jumps over the lazy dog " * 5
    (tmp_path / "one.txt").write_text(text)
    seq_len = 8
    out = tmp_path / "ds"
    prepare_corpus([str(tmp_path / "one.txt")], out, tokenizer="byte", seq_len=seq_len, val_fraction=0.2,
                   block_rows=block_rows, stride=stride, log=quiet)
    m = load_manifest(out)
    train = expected_stream(ByteTokenizer(), [text])[: m.split("train").tokens]
    windows = np.lib.stride_tricks.sliding_window_view(train, seq_len + 1)[::stride]
    np.testing.assert_array_equal(split_rows(out, "train"), windows)
    assert m.split("train").rows == len(windows) and m.split("train").stride == stride
    assert m.split("train").dropped_tokens == len(train) - ((len(windows) - 1) * stride + seq_len + 1)
    # validation keeps stride seq_len: every token predicted once
    assert m.split("val").stride == seq_len
    assert split_rows(out, "val").shape[0] == (m.split("val").tokens - 1) // seq_len


def test_stride_out_of_range_is_refused(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 20)
    with pytest.raises(PrepareError, match="stride must be between 1 and seq_len"):
        prepare_corpus([str(tmp_path / "a.txt")], tmp_path / "out", seq_len=8, stride=9, log=quiet)


# --------------------------------------------------------------------------------------------
# At scale: workers, resume, .gz inputs, document boundaries


def make_corpus(root):
    """Every input kind, a text file of several 2 MiB pieces (one cut inside a newline-free run of
    two-byte characters) and a binary file; returns the documents in input order."""
    root.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gämma", "δέλτα", "ε", "🙂", "x"]

    def text(n):
        return " ".join(rng.choice(words, n)) + "\n"

    docs = []
    docs.append(text(50))
    (root / "a.txt").write_text(docs[-1], encoding="utf-8")
    recs = [{"text": text(int(rng.integers(0, 400))), "n": i} for i in range(300)]
    (root / "b.jsonl").write_bytes(_jsonl(recs[:150]) + b"\n" + _jsonl(recs[150:]))
    docs += [r["text"] for r in recs]
    recs = [{"text": text(int(rng.integers(1, 300)))} for i in range(200)]
    raw = _jsonl(recs)
    (root / "c.jsonl.gz").write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    docs += [r["text"] for r in recs]
    docs.append("".join(text(30) for _ in range(500)))
    (root / "d.txt.gz").write_bytes(gzip.compress(docs[-1].encode("utf-8")))
    docs.append("".join(text(40) for _ in range(600)) + "é" * 1_100_000 + "\n" + text(100))
    (root / "e.txt").write_text(docs[-1], encoding="utf-8")
    (root / "f.bin").write_bytes(b"\x00\xff\xfe" * 1000)
    return docs


def manifest_without_time(out):
    m = json.loads((Path(out) / "manifest.json").read_text())
    m.pop("created")
    return m


@pytest.mark.parametrize("tokenizer", ["byte", "char"])
def test_workers_and_batch_size_do_not_change_the_output(tmp_path, tokenizer):
    docs = make_corpus(tmp_path / "src")
    kwargs = dict(tokenizer=tokenizer, seq_len=64, val_fraction=0.05, block_rows=32, shard_mb=0.3, log=quiet)
    one = prepare_corpus([tmp_path / "src"], tmp_path / "w1", workers=1, **kwargs)
    two = prepare_corpus([tmp_path / "src"], tmp_path / "w2", workers=2, batch_mb=0.2, **kwargs)
    assert len(two["splits"]["train"]["shards"]) > 1
    assert manifest_without_time(tmp_path / "w1") == manifest_without_time(tmp_path / "w2")
    assert one["source"]["skipped_files"] == 1 and one["source"]["files"] == 5
    check_dataset(tmp_path / "w2", load_tokenizer(tmp_path / "w2"), docs, 64)
    assert not (tmp_path / "w2" / ".prepare").exists()


def test_gz_inputs_and_a_truncated_gz(tmp_path):
    docs = ["gzipped text ✓\n" * 30]
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(docs[0].encode("utf-8")))
    recs = [{"text": f"record {i} " * (i + 1)} for i in range(40)]
    raw = _jsonl(recs)
    (tmp_path / "b.jsonl.gz").write_bytes(gzip.compress(raw[:700]) + gzip.compress(raw[700:]))
    docs += [r["text"] for r in recs]
    prepare_corpus([tmp_path / "a.txt.gz", tmp_path / "b.jsonl.gz"], tmp_path / "o", seq_len=8,
                   val_fraction=0.1, log=quiet)
    check_dataset(tmp_path / "o", ByteTokenizer(), docs, 8)

    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(InputError, match=r"cut\.jsonl\.gz: the gzip stream is truncated"):
        prepare_corpus([tmp_path / "cut.jsonl.gz"], tmp_path / "o2", seq_len=8, log=quiet)
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(200)))
    with pytest.raises(InputError, match=r"bad\.gz: corrupt gzip data"):
        prepare_corpus([tmp_path / "bad.gz"], tmp_path / "o3", seq_len=8, log=quiet)


def test_documents_are_separated_by_eos(tmp_path):
    docs = [f"document {i}: " + "word " * (i * 7 % 23) for i in range(60)] + [""]
    for i, d in enumerate(docs):
        (tmp_path / f"{i:03d}.txt").write_text(d)
    out = tmp_path / "out"
    m = prepare_corpus([tmp_path], out, seq_len=16, val_fraction=0.2, log=quiet)
    tok = ByteTokenizer()
    assert m["documents"] == "eos" and m["add_bos"] is False
    # A split's documents are the EOS ids of its part of the stream (its rows and dropped tail).
    stream = expected_stream(tok, docs)
    n_train = m["splits"]["train"]["tokens"]
    assert m["splits"]["train"]["documents"] == np.count_nonzero(stream[:n_train] == tok.eos_id)
    assert m["splits"]["val"]["documents"] == np.count_nonzero(stream[n_train:] == tok.eos_id)
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == len(docs)
    # Cutting the rows' tokens at EOS gives the documents back, in order (bar the dropped tail).
    pieces = tok.decode(unoverlap(split_rows(out, "train")), eos_text="\x00").split("\x00")
    assert len(pieces) > 40 and pieces[:-1] == docs[:len(pieces) - 1]
    assert docs[len(pieces) - 1].startswith(pieces[-1])


class BosByteTokenizer(ByteTokenizer):
    """Byte ids, EOS 256 and a BOS 257."""

    bos_id = 257
    vocab_size = 258

    def to_dict(self):
        return {**super().to_dict(), "vocab_size": 258, "bos_id": 257}


def test_add_bos(tmp_path):
    docs = ["first doc ", "second ", "third document here"]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d)
    with pytest.raises(PrepareError, match="--add-bos: the byte tokenizer has no BOS token"):
        prepare_corpus([tmp_path], tmp_path / "o", seq_len=4, add_bos=True, log=quiet)
    m = prepare_corpus([tmp_path], tmp_path / "o", tokenizer=BosByteTokenizer(), seq_len=4, val_fraction=0,
                       add_bos=True, log=quiet)
    assert m["add_bos"] is True
    expected = np.concatenate([np.r_[257, ByteTokenizer().encode(d), 256] for d in docs])
    stream = unoverlap(split_rows(tmp_path / "o", "train"))
    np.testing.assert_array_equal(stream, expected[:len(stream)])


def interrupt_on(label, after):
    """A log callback that raises KeyboardInterrupt (as Ctrl-C would) at the ``after``-th progress line."""
    seen = []

    def log(msg):
        seen.append(msg)
        if msg.startswith(label + ":") and len([m for m in seen if m.startswith(label + ":")]) == after:
            raise KeyboardInterrupt

    return log, seen


@pytest.mark.parametrize("phase, after", [("tokenize", 3), ("pack", 60)])
def test_resume_after_ctrl_c_is_identical(tmp_path, phase, after):
    docs = make_corpus(tmp_path / "src")
    kwargs = dict(seq_len=64, val_fraction=0.05, block_rows=64, shard_mb=0.1, batch_mb=0.2, progress_s=0)
    prepare_corpus([tmp_path / "src"], tmp_path / "ref", workers=1, log=quiet, **kwargs)
    log, seen = interrupt_on(phase, after)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([tmp_path / "src"], tmp_path / "out", workers=1, log=log, **kwargs)
    assert (tmp_path / "out" / ".prepare" / "state.json").exists()
    logs = []
    prepare_corpus([tmp_path / "src"], tmp_path / "out", workers=1, log=logs.append, **kwargs)
    assert any(line.startswith("resuming: ") for line in logs), logs
    if phase == "pack":
        assert any(re.match(r"resuming: [1-9]\d* shards? \(.* already written", line) for line in logs)
    assert manifest_without_time(tmp_path / "out") == manifest_without_time(tmp_path / "ref")
    check_dataset(tmp_path / "out", ByteTokenizer(), docs, 64)


def test_resume_refuses_other_options_or_inputs_and_restart_starts_over(tmp_path):
    make_corpus(tmp_path / "src")
    kwargs = dict(seq_len=64, batch_mb=0.2, progress_s=0, workers=1)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([tmp_path / "src"], tmp_path / "out", log=interrupt_on("tokenize", 2)[0], **kwargs)
    with pytest.raises(PrepareError, match=r"made with --seq-len 64, not 32;.*--restart"):
        prepare_corpus([tmp_path / "src"], tmp_path / "out", log=quiet, **{**kwargs, "seq_len": 32})
    with pytest.raises(PrepareError, match=r"made with --tokenizer 'byte', not 'char'"):
        prepare_corpus([tmp_path / "src"], tmp_path / "out", log=quiet, tokenizer="char", **kwargs)
    (tmp_path / "src" / "a.txt").write_text("changed")
    with pytest.raises(PrepareError, match=r"input .*a\.txt changed size .* since it started; pass --restart"):
        prepare_corpus([tmp_path / "src"], tmp_path / "out", log=quiet, **kwargs)
    logs = []
    prepare_corpus([tmp_path / "src"], tmp_path / "out", log=logs.append, restart=True, **kwargs)
    assert any(line.startswith("--restart: discarded") for line in logs)
    assert not any(line.startswith("resuming") for line in logs)


def _marked_processes(marker):
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("DISTLM_TEST_MARK") == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def _wait_until_gone(marker, timeout=20.0):
    deadline = time.monotonic() + timeout
    while (left := _marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def _prepare_process(args, marker, log_path):
    env = {**os.environ, "DISTLM_TEST_MARK": marker, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", "distlm", "prepare", *args], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)


def _progress(out):
    try:
        return json.loads((out / ".prepare" / "progress.json").read_text())
    except (OSError, ValueError):
        return None


def _kill_when(proc, out, ready, timeout=90.0):
    """SIGKILL ``proc`` once its progress.json satisfies ``ready``; False if it finished first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        assert time.monotonic() < deadline, "prepare made no progress"
        state = _progress(out)
        if state is not None and ready(state):
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            return True
        time.sleep(0.01)
    return False


@pytest.mark.slow
def test_resume_after_sigkill_is_byte_identical(tmp_path):
    """kill -9 while tokenizing: the workers go too, and the rerun finishes the same dataset."""
    rng = np.random.default_rng(1)
    words = np.array("the of and to in is it that was for on are with as his they at be this from".split())
    with open(tmp_path / "big.jsonl", "w") as f:
        for _ in range(1500):
            f.write(json.dumps({"text": " ".join(rng.choice(words, int(rng.integers(50, 500))))}) + "\n")
    out = tmp_path / "out"
    opts = dict(seq_len=32, block_rows=64, shard_mb=0.02)
    args = [str(tmp_path / "big.jsonl"), "--out", str(out), "--tokenizer", "byte", "--seq-len", "32",
            "--block-rows", "64", "--shard-mb", "0.02", "--batch-mb", "0.02", "--workers", "2"]
    marker, log_path = uuid.uuid4().hex, tmp_path / "log.txt"
    killed = _kill_when(_prepare_process(args, marker, log_path), out,
                        lambda s: 3 <= s["tokenize"]["batches"] and not s["tokenize"]["done"])
    assert killed, "prepare finished before it could be killed"
    assert not _wait_until_gone(marker), "workers outlived the killed prepare"
    with pytest.raises(PrepareError, match=r"made with --val-fraction 0.01, not 0.5;.*--restart"):
        prepare_corpus([tmp_path / "big.jsonl"], out, val_fraction=0.5, log=quiet, **opts)

    final = _prepare_process(args, marker, log_path)
    assert final.wait(timeout=120) == 0, log_path.read_text()[-3000:]
    assert re.search(r"resuming: \d+ batches .* already tokenized", log_path.read_text())
    assert not _wait_until_gone(marker) and not (out / ".prepare").exists()
    prepare_corpus([tmp_path / "big.jsonl"], tmp_path / "ref", workers=1, log=quiet, **opts)
    assert manifest_without_time(out) == manifest_without_time(tmp_path / "ref")


def test_worker_error_names_file_and_line_and_stops_the_workers(tmp_path):
    good = _jsonl([{"text": "fine text " * 20}] * 300)
    (tmp_path / "a.jsonl").write_bytes(good)
    (tmp_path / "b.jsonl").write_bytes(b"".join(good.splitlines(keepends=True)[:4]) + b'{"text": "cut\n' + good)
    marker = uuid.uuid4().hex
    result = subprocess.run([sys.executable, "-m", "distlm", "prepare", str(tmp_path), "--out", str(tmp_path / "o"),
                             "--seq-len", "8", "--batch-mb", "0.02", "--workers", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DISTLM_TEST_MARK": marker})
    assert result.returncode == 3, result.stderr[-3000:]
    assert re.search(r"distlm: data error: .*b\.jsonl:5: invalid JSON .*fix or remove the line", result.stderr)
    assert "Traceback" not in result.stderr
    assert not _wait_until_gone(marker, timeout=5)


def test_files_of_the_users_in_out_are_neither_overwritten_nor_deleted(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "tokenizer.json").write_text('{"mine": true}')
    (tmp_path / "t.txt").write_text("some text " * 100)
    with pytest.raises(PrepareError, match=r"already holds tokenizer.json, not from an interrupted prepare"):
        prepare_corpus([str(tmp_path / "t.txt")], str(out), seq_len=16, log=lambda _m: None)
    assert (out / "tokenizer.json").read_text() == '{"mine": true}'
    # A refusal for a too-small split removes what it wrote, but not a folder it did not create.
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep")
    with pytest.raises(PrepareError, match="one row needs"):
        prepare_corpus([str(tmp_path / "t.txt")], str(other), seq_len=4096, log=lambda _m: None)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]


def test_a_run_killed_after_its_manifest_is_finished_by_the_same_command(tmp_path, monkeypatch):
    from distlm.data import prepare_run

    (tmp_path / "t.txt").write_text("finished but not cleaned up " * 200)
    out = tmp_path / "d"
    real_rmtree = prepare_run.shutil.rmtree

    def killed(path, *a, **kw):
        if str(path).endswith(".prepare") and (out / "manifest.json").exists():
            raise KeyboardInterrupt  # the process dies between the manifest and the clean-up
        return real_rmtree(path, *a, **kw)

    monkeypatch.setattr(prepare_run.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare_corpus([str(tmp_path / "t.txt")], str(out), seq_len=16, log=lambda _m: None)
    monkeypatch.setattr(prepare_run.shutil, "rmtree", real_rmtree)
    assert (out / ".prepare").is_dir() and (out / "manifest.json").is_file()
    logged = []
    manifest = prepare_corpus([str(tmp_path / "t.txt")], str(out), seq_len=16, log=logged.append)
    assert not (out / ".prepare").exists() and "completed by an interrupted run" in logged[-1]
    assert manifest == json.loads((out / "manifest.json").read_text())
    with pytest.raises(PrepareError, match="already holds a prepared dataset"):
        prepare_corpus([str(tmp_path / "t.txt")], str(out), seq_len=16, log=lambda _m: None)
