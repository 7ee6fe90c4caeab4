from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distlm.data.tokenizers import (
    ByteTokenizer,
    CharTokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"


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
