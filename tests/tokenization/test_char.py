"""Character tokenizer: deterministic vocabulary, round trip, <unk>, persistence, errors."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.tokenization import CharTokenizer, load_tokenizer


def test_vocabulary_order_and_round_trip():
    tok = CharTokenizer.train(["明月光", "月光"], special_tokens=["<pad>", "<unk>"])
    # specials first, then by descending count (月, 光: 2; 明: 1), ties by code point
    assert tok.itos == ["<pad>", "<unk>", "光", "月", "明"]  # 光 U+5149 < 月 U+6708
    assert tok.decode(tok.encode("明月")) == "明月"
    assert tok.encode("霜") == [tok.token_id("<unk>")]


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_round_trip_on_training_text(text):
    tok = CharTokenizer.train([text or "a"])
    assert tok.decode(tok.encode(text or "a")) == (text or "a")


def test_save_load(tmp_path):
    tok = CharTokenizer.train(["床前明月光"], special_tokens=["<pad>"])
    tok.save(tmp_path / "char.json")
    again = load_tokenizer(tmp_path / "char.json")
    assert isinstance(again, CharTokenizer) and again.itos == tok.itos


def test_batch():
    tok = CharTokenizer.train(["abc"], special_tokens=["<pad>"])
    batch = tok.encode_batch(["abc", "a"])
    assert batch.input_ids.tolist() == [tok.encode("abc"), tok.encode("a") + [0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    left = tok.encode_batch(["abc"], max_length=2, truncation_side="left")
    assert tok.decode(left.input_ids[0].tolist()) == "bc"


def test_errors():
    tok = CharTokenizer.train(["abc"])
    with pytest.raises(ValueError, match=r"'z' \(U\+007A\) is not in the vocabulary"):
        tok.encode("z")
    with pytest.raises(TypeError, match="must be a str, got NoneType"):
        tok.encode(None)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 3\): \[3\]"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="empty corpus"):
        CharTokenizer.train([""])
    with pytest.raises(KeyError, match="no special token '<pad>'"):
        tok.token_id("<pad>")
