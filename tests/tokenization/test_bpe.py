"""Byte-level BPE: GPT-2 parity (tiktoken and transformers built offline), training parity with
tokenizers' BpeTrainer, round trips, export, persistence and error paths."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.data import GPT2_ENCODER, GPT2_MERGES, data_path
from companion.tokenization import BPETokenizer, bytes_to_unicode, gpt2_tiktoken_encoding, load_gpt2_tokenizer

MIXED = [
    "Hello, world! It's 2024 and we're testing GPT-2's tokenizer.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "def add(a, b):\n    return a + b  # sum\n\n\tif x != y: pass",
    "Emoji 🤖🎉👩‍👩‍👧‍👦 and flags 🇨🇳🇺🇸",
    "   leading and trailing spaces   ",
    "tabs\t\tand\n\n\nnewlines \r\n windows",
    "Ünïcödé: naïve café, Ελληνικά, русский, العربية, עברית, हिन्दी, 日本語のテキスト, 한국어",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√∞ ≠ ≤ 1e-9 0x1F 3.14159",
    "zero\u200bwidth\u00a0nbsp\ufeffbom \u0301combining",
    "'s 't 're 've 'm 'll 'd 'S 'LL  'x",
    "a" * 300 + " " + "的" * 50,
    "",
    "<|endoftext|> is special; <|endoftext is not",
]

SMALL_CORPUS = [
    "low lower lowest newer wider new news",
    "the quick brown fox jumps over the lazy dog. The dog sleeps.",
    "床前明月光，疑是地上霜。举头望明月，低头思故乡。",
    "春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。",
    "aaaa aaa aa a bbb abab abababab",
    "def f(x):\n    return x * x\n\nprint(f(3))",
] * 3


@pytest.fixture(scope="module")
def gpt2():
    return load_gpt2_tokenizer()


def test_gpt2_matches_tiktoken(gpt2):
    enc = gpt2_tiktoken_encoding()
    for text in MIXED:
        assert gpt2.encode(text) == enc.encode(text, allowed_special="all"), text


def test_gpt2_matches_transformers(gpt2):
    from transformers import GPT2Tokenizer  # transformers 5.x: the tokenizers-backed class

    ref = GPT2Tokenizer(vocab=str(data_path(GPT2_ENCODER)), merges=str(data_path(GPT2_MERGES)))
    assert ref("Hello world")["input_ids"] == [15496, 995]  # guard: the reference really loaded the files
    for text in MIXED:
        assert gpt2.encode(text) == ref(text)["input_ids"], text


def test_gpt2_known_ids(gpt2):
    # ids from the GPT-2 paper's released vocabulary: "Hello" = 15496, " world" = 995, <|endoftext|> = 50256
    assert gpt2.encode("Hello world") == [15496, 995]
    assert gpt2.encode("<|endoftext|>") == [50256]
    assert gpt2.vocab_size == 50257


def test_gpt2_files_are_openais():
    # the sums tiktoken_ext.openai_public pins for OpenAI's own copies of these files
    import hashlib

    assert hashlib.sha256(data_path(GPT2_ENCODER).read_bytes()).hexdigest().startswith("196139668be63f3b")
    assert hashlib.sha256(data_path(GPT2_MERGES).read_bytes()).hexdigest().startswith("1ce1664773c50f3e")


def test_fast_path_same_ids(gpt2):
    assert gpt2.encode_many(MIXED, fast=True) == [gpt2.encode(t) for t in MIXED]
    hf = gpt2.to_hf()
    assert [hf.decode(gpt2.encode(t)) for t in MIXED[:-2]] == MIXED[:-2]


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_any_unicode(text):
    gpt2 = load_gpt2_tokenizer()
    assert gpt2.decode(gpt2.encode(text)) == text


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=60))
def test_round_trip_trained(text):
    tok = _trained()
    assert tok.decode(tok.encode(text)) == text


_CACHE = {}


def _trained():
    if "tok" not in _CACHE:
        _CACHE["tok"] = BPETokenizer.train(SMALL_CORPUS, 400, special_tokens=["<pad>", "<eos>"])
    return _CACHE["tok"]


@pytest.mark.parametrize("vocab_size", [260, 300, 420])
def test_training_matches_tokenizers(vocab_size):
    ours = BPETokenizer.train(SMALL_CORPUS, vocab_size, special_tokens=["<pad>"])
    ref = BPETokenizer.train_fast(SMALL_CORPUS, vocab_size, special_tokens=["<pad>"])
    assert ours.merges == ref.merges
    assert ours.vocab_size == ref.vocab_size <= vocab_size


def test_training_matches_tokenizers_custom_pattern():
    pattern = r"\p{Han}|[^\p{Han}\s]+|\s+"  # one Chinese character per piece
    ours = BPETokenizer.train(SMALL_CORPUS, 330, pattern=pattern)
    ref = BPETokenizer.train_fast(SMALL_CORPUS, 330, pattern=pattern)
    assert ours.merges == ref.merges
    assert all(len(ours.token_bytes(i).decode("utf-8", "ignore")) <= 1 for i in ours.encode("床前明月光"))


def test_first_merge_is_most_frequent_pair():
    tok = BPETokenizer.train(["ab ab ab cd"], 257)
    a, b = tok.merges[0]
    # pieces "ab", " ab", " ab", " cd": the pair (a, b) occurs 3 times, (" ", a) twice, the rest once
    assert tok.vocab[a] + tok.vocab[b] == b"ab"


def test_export_tiktoken_and_hf_agree():
    tok = _trained()
    enc, hf = tok.to_tiktoken(), tok.to_hf()
    for text in SMALL_CORPUS[:6] + MIXED:
        ids = tok.encode(text)
        assert enc.encode(text, allowed_special="all") == ids
        assert hf.encode(text).ids == ids


def test_save_load(tmp_path):
    tok = _trained()
    tok.save(tmp_path / "bpe.json")
    again = BPETokenizer.load(tmp_path / "bpe.json")
    assert again.merges == tok.merges and again.special_tokens == tok.special_tokens
    assert again.encode("床前明月光<eos>") == tok.encode("床前明月光<eos>")
    assert tok.encode("x<eos>")[-1] == tok.token_id("<eos>")


def test_batch_encoding_padding_and_truncation():
    tok = _trained()
    batch = tok.encode_batch(["low", "the quick brown fox"], max_length=3, padding="max_length")
    assert batch.input_ids.shape == (2, 3)
    assert batch.attention_mask.tolist()[0] == [1] * len(tok.encode("low")) + [0] * (3 - len(tok.encode("low")))
    assert batch.input_ids[1].tolist() == tok.encode("the quick brown fox")[:3]
    assert batch.input_ids[0, -1].item() == tok.token_id("<pad>")
    longest = tok.encode_batch(["a", "bbb abab"])
    assert longest.input_ids.shape[1] == max(longest.lengths)
    assert tok.decode_batch(longest.input_ids, longest.attention_mask) == ["a", "bbb abab"]


def test_bytes_to_unicode_is_a_bijection():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256


def test_errors():
    tok = _trained()
    with pytest.raises(TypeError, match="must be a str, got bytes"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="got int"):
        tok.encode(42)
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, 400\): \[400, -1\]"):
        tok.decode([1, 400, -1])
    with pytest.raises(ValueError, match="empty corpus"):
        BPETokenizer.train([], 300)
    with pytest.raises(ValueError, match="empty corpus"):
        BPETokenizer.train(["", ""], 300)
    with pytest.raises(ValueError, match=r"at least 256 .* \+ 1 special tokens = 257, got 100"):
        BPETokenizer.train(["abc"], 100, special_tokens=["<pad>"])
    with pytest.raises(ValueError, match="padding must be"):
        tok.encode_batch(["a"], padding="max")
    with pytest.raises(ValueError, match="refers to ids outside"):
        BPETokenizer([(0, 999)])
