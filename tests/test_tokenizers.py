import hashlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distlm.data.inputs import InputError
from distlm.data.tokenizer_train import SPECIAL_TOKENS, TokenizerTrainError, train_bpe
from distlm.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
needs_shakespeare = pytest.mark.skipif(
    not SHAKESPEARE.exists(), reason=f"tiny Shakespeare not found at {SHAKESPEARE} (shared data folder)"
)
SLICE_CHARS = 200_000  # ~0.2 s of BPE training; the whole file takes ~1 s

# Varied text for round trips: accents, CJK, emoji (astral plane), combining marks, RTL,
# control characters, odd whitespace, and special-token strings that must stay plain text.
VARIED = [
    "",
    " ",
    "héllo wörld ✓ 日本語 🙂 👩‍👩‍👧 e\u0301 مرحبا\r\n\x00\tend  ",
    "  leading and trailing spaces  \n\n\n",
    "<|endoftext|> and </s> and <s> and <|pad|><|mask|><|bos|> in the middle of text",
    "ÆØÅ ß ẞ ﬁ Ω ≈ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


def test_byte_round_trip_non_ascii():
    tok = ByteTokenizer()
    text = "héllo wörld ✓ 日本語 🙂\r\n\x00end"
    ids = tok.encode(text)
    assert ids.dtype in (np.uint32, np.int64)
    assert ids.tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")


def test_byte_decode_renders_eos_as_eos_text():
    tok = ByteTokenizer()
    ids = np.concatenate([tok.encode("ab"), [tok.eos_id], tok.encode("ç")])
    assert tok.decode(ids) == "abç"
    assert tok.decode(ids, eos_text="<|eos|>") == "ab<|eos|>ç"


def test_byte_decode_of_broken_utf8_does_not_raise():
    assert ByteTokenizer().decode([0xE6, 0x97]) == "\ufffd"


def test_decode_rejects_out_of_range_ids():
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ByteTokenizer().decode([257])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        CharTokenizer.fit(["ab"]).decode([-1])


@settings(max_examples=40, deadline=None)
@given(st.text())
def test_byte_round_trip_property(text):
    tok = ByteTokenizer()
    assert tok.decode(tok.encode(text)) == text


def test_char_fit_encode_decode():
    tok = CharTokenizer.fit(["hello", " world", "!"])
    assert tok.chars == sorted(set("hello world!"))
    assert tok.eos_id == len(tok.chars) and tok.vocab_size == len(tok.chars) + 1
    ids = tok.encode("hello world!")
    assert ids.tolist() == [tok.chars.index(c) for c in "hello world!"]
    assert tok.decode(ids) == "hello world!"
    with_eos = np.concatenate([ids, [tok.eos_id], tok.encode("wow")])
    assert tok.decode(with_eos) == "hello world!wow"
    assert tok.decode(with_eos, eos_text="|") == "hello world!|wow"


def test_char_unknown_character_error_names_it():
    tok = CharTokenizer.fit(["abc"])
    with pytest.raises(ValueError, match=r"'z'.*rebuild the tokenizer"):
        tok.encode("abz")
    with pytest.raises(ValueError, match="U\\+1F642"):
        tok.encode("🙂")


def test_char_non_bmp_round_trip():
    text = "a🙂b日"
    tok = CharTokenizer.fit([text])
    assert tok.decode(tok.encode(text)) == text


def test_char_fit_on_empty_corpus_fails():
    with pytest.raises(ValueError, match="empty"):
        CharTokenizer.fit(["", ""])


def test_dict_and_file_round_trip(tmp_path):
    for tok in (ByteTokenizer(), CharTokenizer.fit(["xyz\n"])):
        assert tokenizer_from_dict(tok.to_dict()) == tok
        path = tmp_path / f"{tok.name}.json"
        tok.save(path)
        loaded = load_tokenizer(path)
        assert loaded == tok and loaded.vocab_size == tok.vocab_size
    # A dataset folder holding tokenizer.json also works as a spec.
    CharTokenizer.fit(["q"]).save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path) == CharTokenizer.fit(["q"])


def test_damaged_spec_is_caught():
    d = CharTokenizer.fit(["abc"]).to_dict()
    d["vocab_size"] = 99
    with pytest.raises(ValueError, match="vocab_size"):
        tokenizer_from_dict(d)


def test_load_tokenizer_specs():
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match="fitted"):
        load_tokenizer("char")
    with pytest.raises(ValueError, match=r"unknown tokenizer 'bpe'.*'byte'.*'char'.*tokenizer\.json"):
        load_tokenizer("bpe")


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason="tiny Shakespeare not available")
def test_char_tokenizer_on_tiny_shakespeare_has_65_chars():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    tok = CharTokenizer.fit([text])
    assert len(tok.chars) == 65 and tok.vocab_size == 66
    assert tok.decode(tok.encode(text)) == text


# --------------------------------------------------------------------------------------------
# Byte-level BPE (Hugging Face tokenizers): training, encoding, saving


@pytest.fixture(scope="module")
def shakespeare_slice(tmp_path_factory):
    if not SHAKESPEARE.exists():
        pytest.skip(f"tiny Shakespeare not found at {SHAKESPEARE} (shared data folder)")
    path = tmp_path_factory.mktemp("corpus") / "shakespeare-slice.txt"
    path.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:SLICE_CHARS], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bpe_file(shakespeare_slice, tmp_path_factory):
    out = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    summary = train_bpe([shakespeare_slice], out, 400, log=lambda m: None)
    assert summary["vocab_size"] == 400 and summary["documents"] == 1
    return out


@pytest.fixture(scope="module")
def bpe(bpe_file):
    return load_tokenizer(bpe_file)


def test_bpe_trained_vocab_and_special_ids(bpe, bpe_file):
    assert isinstance(bpe, HFTokenizer) and bpe.name == "hf"
    assert bpe.vocab_size == 400
    assert (bpe.eos_id, bpe.pad_id, bpe.mask_id, bpe.bos_id) == (0, 1, 2, 3)
    d = bpe.to_dict()
    assert d["special_tokens"] == {"eos": "<|endoftext|>", "pad": "<|pad|>", "mask": "<|mask|>", "bos": "<|bos|>"}
    # The manifest's sha256 is that of the file prepare copies into the dataset folder.
    assert d["sha256"] == hashlib.sha256(bpe_file.read_bytes()).hexdigest()
    json.dumps(d)
    # The file is a plain HF tokenizer.json that HF itself loads.
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(bpe_file)).get_vocab_size() == 400
    assert [bpe.hf_tokenizer.id_to_token(i) for i in range(4)] == list(SPECIAL_TOKENS)
    # BPE learned merges from the corpus (only 140 at this size): common words take fewer tokens.
    assert len(bpe.encode("the king and the queen")) <= 0.6 * len("the king and the queen")


@pytest.mark.parametrize("text", VARIED)
def test_bpe_round_trip_and_no_special_ids_from_text(bpe, text):
    ids = bpe.encode(text)
    assert ids.ndim == 1 and ids.dtype == np.uint32
    assert bpe.decode(ids) == text
    assert not np.isin(ids, [0, 1, 2, 3]).any(), "special ids must only come from prepare, never from text"
    assert (ids < bpe.vocab_size).all()


@settings(max_examples=60, deadline=None)
@given(st.text())
def test_bpe_round_trip_property(bpe, text):
    ids = bpe.encode(text)
    assert bpe.decode(ids) == text
    assert not np.isin(ids, [0, 1, 2, 3]).any()


def test_bpe_encode_never_adds_eos_or_bos(bpe):
    assert bpe.encode("").size == 0
    ids = bpe.encode("To be, or not to be")
    assert ids.size and ids[0] != bpe.bos_id and ids[-1] != bpe.eos_id
    # The literal EOS text is several ordinary tokens, not id 0.
    assert bpe.encode("<|endoftext|>").size > 1


def test_bpe_encode_batch_matches_encode(bpe):
    texts = VARIED + ["First Citizen:\nBefore we proceed any further, hear me speak."]
    batch = bpe.encode_batch(texts)
    assert len(batch) == len(texts)
    for text, ids in zip(texts, batch):
        assert ids.dtype == np.uint32 and ids.tolist() == bpe.encode(text).tolist()


def test_bpe_decode_renders_eos_and_drops_other_specials(bpe):
    a, b = bpe.encode("ab"), bpe.encode("çd")
    ids = np.concatenate([[bpe.bos_id], a, [bpe.eos_id], b, [bpe.pad_id, bpe.pad_id, bpe.mask_id]])
    assert bpe.decode(ids) == "abçd"
    assert bpe.decode(ids, eos_text="<|eos|>") == "ab<|eos|>çd"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        bpe.decode([bpe.vocab_size])


def test_bpe_save_load_pickle_equality(bpe, tmp_path):
    path = tmp_path / "copy.json"
    bpe.save(path)
    loaded = load_tokenizer(path)
    assert loaded == bpe and loaded.to_dict() == bpe.to_dict()
    text = VARIED[2]
    assert loaded.encode(text).tolist() == bpe.encode(text).tolist()
    # Data-loader workers get pickled copies: they must still keep special text as text.
    clone = pickle.loads(pickle.dumps(bpe))
    assert clone == bpe and clone.encode(VARIED[4]).tolist() == bpe.encode(VARIED[4]).tolist()
    # The manifest summary cannot rebuild an HF tokenizer: it says where the vocabulary is.
    with pytest.raises(ValueError, match="load the tokenizer.json"):
        tokenizer_from_dict(bpe.to_dict())


def test_bpe_training_is_deterministic(shakespeare_slice, bpe_file, tmp_path):
    again = tmp_path / "again.json"
    train_bpe([shakespeare_slice], again, 400, log=lambda m: None)
    assert again.read_bytes() == bpe_file.read_bytes()


def test_train_bpe_errors(tmp_path):
    text = tmp_path / "a.txt"
    text.write_text("some text " * 50)
    with pytest.raises(TokenizerTrainError, match=r"--vocab-size 260 is too small.*at least 261"):
        train_bpe([text], tmp_path / "t.json", 260)
    with pytest.raises(InputError, match="missing.txt does not exist"):
        train_bpe([tmp_path / "missing.txt"], tmp_path / "t.json", 300)
    with pytest.raises(TokenizerTrainError, match="is a folder"):
        train_bpe([text], tmp_path, 300)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "e.txt").write_text("")
    (tmp_path / "empty" / "b.bin").write_bytes(b"\xff\xfe\x00binary")
    logs = []
    with pytest.raises(TokenizerTrainError, match="no text found: 1 of 2 input files were skipped"):
        train_bpe([tmp_path / "empty"], tmp_path / "t.json", 300, log=logs.append)
    assert any("skipping" in m and "b.bin" in m for m in logs)
    assert not (tmp_path / "t.json").exists()


def test_train_bpe_reads_jsonl_and_skips_binary_and_its_own_output(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    records = [{"text": f"document number {i} says hello world"} for i in range(50)]
    (corpus / "docs.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    (corpus / "binary.dat").write_bytes(bytes(range(256)) * 4)
    out = corpus / "tokenizer.json"
    out.write_text("stale output of an earlier run, not training text")
    logs = []
    summary = train_bpe([corpus], out, 300, log=logs.append)
    assert (summary["documents"], summary["files"], summary["skipped_files"]) == (50, 1, 1)
    assert any("skipping" in m and "binary.dat" in m for m in logs)
    assert "trained byte-level BPE" in logs[-1] and "50 documents" in logs[-1]
    tok = load_tokenizer(out)
    assert tok.decode(tok.encode("document number 7")) == "document number 7"
    assert "stale" not in tok.hf_tokenizer.get_vocab()


# --------------------------------------------------------------------------------------------
# Any HF tokenizer.json, written by HF itself


def _hf_word_level(specials, vocab_words=("hello", "world"), special_flag=True):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0}
    for w in vocab_words:
        vocab[w] = len(vocab)
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_tokens([AddedToken(s, special=special_flag, normalized=False) for s in specials])
    return tk


def test_load_bare_hf_tokenizer_json_written_by_hf(tmp_path):
    from tokenizers.processors import TemplateProcessing

    tk = _hf_word_level(["<s>", "</s>", "<pad>"])
    # A BOS/EOS template like Llama's: distlm's encode must not apply it.
    tk.post_processor = TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 3), ("</s>", 4)])
    path = tmp_path / "hf-tokenizer.json"
    tk.save(str(path))
    tok = load_tokenizer(path)
    assert isinstance(tok, HFTokenizer)
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.mask_id, tok.vocab_size) == (4, 3, 5, None, 6)
    assert tok.hf_tokenizer.encode("hello world").ids == [3, 1, 2, 4]  # HF itself applies the template
    assert tok.encode("hello world").tolist() == [1, 2]
    # "</s>" typed in a document is not EOS (here it is unknown words, as WordLevel has no bytes).
    assert 4 not in tok.encode("hello </s> world").tolist()
    # A dataset folder holding it loads the same tokenizer; re-saving keeps it an HF file.
    tok.save(tmp_path / "tokenizer.json")
    assert load_tokenizer(tmp_path) == tok
    assert "added_tokens" in json.loads((tmp_path / "tokenizer.json").read_text())


def test_hf_tokenizer_without_eos_is_refused_with_a_fix(tmp_path):
    path = tmp_path / "no-eos.json"
    _hf_word_level(["<pad>"]).save(str(path))
    with pytest.raises(ValueError, match=r"no-eos\.json: no end-of-document \(EOS\) token.*add_special_tokens"):
        load_tokenizer(path)


def test_hf_eos_that_text_can_produce_is_refused(tmp_path):
    # Added but not special: HF would cut "</s>" out of plain text, faking a document boundary.
    path = tmp_path / "plain-eos.json"
    _hf_word_level(["</s>"], special_flag=False).save(str(path))
    with pytest.raises(ValueError, match=r"plain text '</s>' encodes to the special id 3.*fake document boundary"):
        load_tokenizer(path)
    # The same for PAD only makes it an ordinary token: no PAD, but the tokenizer loads.
    path = tmp_path / "plain-pad.json"
    tk = _hf_word_level(["<pad>"], special_flag=False)
    tk.add_special_tokens(["</s>"])
    tk.save(str(path))
    tok = load_tokenizer(path)
    assert (tok.eos_id, tok.pad_id) == (4, None)
    assert tok.encode("hello <pad>").tolist() == [1, 3]


# --------------------------------------------------------------------------------------------
# SentencePiece


def _train_sentencepiece(tmp_path, text, **extra):
    import sentencepiece as spm

    corpus = tmp_path / "sp-corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    prefix = tmp_path / "sp"
    options = dict(input=str(corpus), model_prefix=str(prefix), vocab_size=300, model_type="bpe",
                   byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
                   character_coverage=1.0, minloglevel=2)
    options.update(extra)
    spm.SentencePieceTrainer.train(**options)
    return prefix.with_suffix(".model")


SP_TEXT = "\n".join(f"line {i}: the quick brown fox jumps over the lazy dog; " * 3 for i in range(200))


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory):
    # byte_fallback adds 256 byte pieces, so 300 leaves ~40 for characters and merges.
    return _train_sentencepiece(tmp_path_factory.mktemp("sp"), SP_TEXT)


def test_sentencepiece_model_loads_with_special_ids(sp_model):
    tok = load_tokenizer(sp_model)
    assert isinstance(tok, SentencePieceTokenizer) and tok.name == "sentencepiece"
    assert tok.vocab_size == 300
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.mask_id) == (2, 1, None, None)  # spm defaults
    assert tok.to_dict()["sha256"] == hashlib.sha256(sp_model.read_bytes()).hexdigest()


@pytest.mark.parametrize("text", VARIED[1:] + ["the quick brown fox"])
def test_sentencepiece_round_trip_and_no_special_ids_from_text(sp_model, text):
    tok = load_tokenizer(sp_model)
    ids = tok.encode(text)
    assert ids.dtype == np.uint32 and tok.decode(ids) == text
    assert not np.isin(ids, [tok.eos_id, tok.bos_id]).any()
    assert tok.encode("").size == 0


def test_sentencepiece_decode_and_batch(sp_model):
    tok = load_tokenizer(sp_model)
    ids = np.concatenate([[tok.bos_id], tok.encode("the fox"), [tok.eos_id], tok.encode("a dog")])
    assert tok.decode(ids) == "the foxa dog"
    assert tok.decode(ids, eos_text="|") == "the fox|a dog"
    assert [x.tolist() for x in tok.encode_batch(["the", "fox 🙂"])] == [tok.encode("the").tolist(),
                                                                       tok.encode("fox 🙂").tolist()]


def test_sentencepiece_save_is_self_contained(sp_model, tmp_path):
    tok = load_tokenizer(sp_model)
    (tmp_path / "ds").mkdir()
    tok.save(tmp_path / "ds" / "tokenizer.json")
    saved = json.loads((tmp_path / "ds" / "tokenizer.json").read_text())
    assert saved["name"] == "sentencepiece" and "model_proto_b64" in saved
    loaded = load_tokenizer(tmp_path / "ds")  # no .model file needed next to it
    assert loaded == tok and loaded.to_dict() == tok.to_dict()
    assert loaded.encode(VARIED[2]).tolist() == tok.encode(VARIED[2]).tolist()
    assert pickle.loads(pickle.dumps(tok)) == tok
    # A damaged file is caught, not silently used.
    saved["eos_id"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match=r"bad\.json: .*eos_id=7"):
        load_tokenizer(tmp_path / "bad.json")


def test_sentencepiece_without_eos_is_refused(tmp_path):
    model = _train_sentencepiece(tmp_path, SP_TEXT, eos_id=-1)
    with pytest.raises(ValueError, match=r"sp\.model: no end-of-document \(EOS\) token.*--eos_id"):
        load_tokenizer(model)


def test_load_tokenizer_rejects_non_tokenizer_files(tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(ValueError, match=r"x\.json is JSON but not a tokenizer file"):
        load_tokenizer(tmp_path / "x.json")
    (tmp_path / "x.model").write_bytes(b"\x00\x01 definitely not a protobuf \xff" * 3)
    with pytest.raises(ValueError, match=r"x\.model is not a tokenizer file"):
        load_tokenizer(tmp_path / "x.model")
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="holds no tokenizer.json"):
        load_tokenizer(tmp_path / "folder")


# --------------------------------------------------------------------------------------------
# CLI and prepare end to end


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "distlm", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_cli_tokenizer_train(shakespeare_slice, bpe_file, tmp_path, capsys):
    from distlm.cli import main

    out = tmp_path / "sub" / "tokenizer.json"
    r = _cli("tokenizer", "train", shakespeare_slice, "--vocab-size", 400, "--out", out, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "vocab 400" in r.stderr and "1 document from 1 file" in r.stderr
    # Another process (another hash seed) gives the same bytes as the in-process training.
    assert out.read_bytes() == bpe_file.read_bytes()
    # The error path in-process (each `python -m distlm` pays ~3 s of torch import in main()).
    code = main(["tokenizer", "train", str(shakespeare_slice), "--vocab-size", "100", "--out", str(tmp_path / "x.json")])
    assert code == 3 and "--vocab-size 100 is too small" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_prepare_with_trained_bpe(bpe_file, tmp_path):
    from distlm.data.prepare import prepare_corpus

    txt = tmp_path / "small.txt"
    txt.write_text("First Citizen:\nYou are all resolved rather to die than to famish? <|endoftext|> 🙂\n" * 20,
                   encoding="utf-8")
    out = tmp_path / "ds"
    manifest = prepare_corpus([txt], out, tokenizer=str(bpe_file), seq_len=32, val_fraction=0.1, log=lambda m: None)
    bpe = load_tokenizer(bpe_file)
    assert manifest["vocab_size"] == 400 and manifest["tokenizer"] == bpe.to_dict()
    reloaded = load_tokenizer(out)
    assert reloaded == bpe
    text = txt.read_text(encoding="utf-8")
    assert reloaded.encode(text).tolist() == bpe.encode(text).tolist()
    total = sum(s["tokens"] for s in manifest["splits"].values())
    assert total == len(bpe.encode(text)) + 1  # one document, one EOS appended by prepare
