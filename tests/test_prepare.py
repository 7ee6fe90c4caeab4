import json
import tempfile
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


def test_leftovers_of_interrupted_run_are_removed(tmp_path):
    (tmp_path / "a.txt").write_text("abc " * 100)
    out = tmp_path / "out"
    out.mkdir()
    (out / "train-000007.tar").write_bytes(b"stale")
    (out / "train-000000.tar.tmp").write_bytes(b"stale")
    (out / "notes.txt").write_text("user file")
    prepare_corpus([str(tmp_path / "a.txt")], str(out), seq_len=8, val_fraction=0.1, log=quiet)
    assert not (out / "train-000007.tar").exists() and not (out / "train-000000.tar.tmp").exists()
    assert (out / "notes.txt").read_text() == "user file"


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
