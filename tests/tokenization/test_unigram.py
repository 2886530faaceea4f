"""Unigram: Viterbi segmentation equals tokenizers' Unigram model given the same pieces and scores (unknown
characters and byte fallback included); EM training is compared with UnigramTrainer by likelihood."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from companion.data import load_shakespeare, load_tang_poems
from companion.tokenization import UnigramTokenizer, load_tokenizer
from companion.tokenization.unigram import pretokenize


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return load_tang_poems()["text"][:80] + load_shakespeare()["text"][0][:8000].split("\n")


@pytest.fixture(scope="module")
def held_out() -> list[str]:
    return load_tang_poems()["text"][500:530] + load_shakespeare()["text"][1][:3000].split("\n") + [
        "naïve café 🤖 123  spaced  ", "月下独酌，Zürich!"]


@pytest.fixture(scope="module")
def trained(corpus) -> UnigramTokenizer:
    return UnigramTokenizer.train(corpus, 1500, seed_size=3000)


def hf_trained(corpus, vocab_size: int) -> HFTokenizer:
    hf = HFTokenizer(models.Unigram())
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    hf.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<unk>"],
                                                           unk_token="<unk>", show_progress=False))
    return hf


def test_viterbi_equals_tokenizers_unigram(trained, held_out):
    hf = trained.to_hf()
    for text in held_out:
        assert hf.encode(text).ids == trained.encode(text), text


def test_viterbi_equals_tokenizers_on_its_trained_pieces(corpus, held_out):
    hf = hf_trained(corpus, 1500)
    model = json.loads(hf.to_str())["model"]
    ours = UnigramTokenizer([tuple(p) for p in model["vocab"]], unk_id=model["unk_id"])
    for text in held_out:
        assert hf.encode(text).ids == ours.encode(text), text


def test_byte_fallback_equals_tokenizers(corpus):
    tok = UnigramTokenizer.train(corpus[:30], 1400, byte_fallback=True, seed_size=500)
    hf = tok.to_hf()
    text = "月下独酌 🤖 Zürich"
    assert tok.encode(text) == hf.encode(text).ids
    assert "<0xF0>" in tok.tokenize(text)  # the emoji is not in the vocabulary: its 4 UTF-8 bytes
    assert tok.decode(tok.encode(text)) == text


def test_training_likelihood_close_to_unigram_trainer(corpus, trained, held_out):
    hf = hf_trained(corpus, 1500)
    model = json.loads(hf.to_str())["model"]
    theirs = UnigramTokenizer([tuple(p) for p in model["vocab"]], unk_id=model["unk_id"])
    texts = [t for t in held_out[:-2]]
    chars = sum(map(len, texts))
    ours_ll, theirs_ll = trained.log_likelihood(texts) / chars, theirs.log_likelihood(texts) / chars
    assert math.isfinite(ours_ll) and abs(ours_ll - theirs_ll) / abs(theirs_ll) < 0.25, (ours_ll, theirs_ll)
    ours_tpc = sum(len(trained.encode(t)) for t in texts) / chars
    theirs_tpc = sum(len(theirs.encode(t)) for t in texts) / chars
    assert abs(ours_tpc - theirs_tpc) / theirs_tpc < 0.2, (ours_tpc, theirs_tpc)


def test_em_prefers_the_more_probable_segmentation():
    tok = UnigramTokenizer([("<unk>", 0.0), ("a", -3.0), ("b", -3.0), ("ab", -4.0), ("▁", -1.0), ("▁a", -5.0)])
    assert tok.tokenize("ab") == ["▁", "ab"]  # -1 - 4 = -5 beats ▁a + b = -8 and ▁ + a + b = -7
    assert tok.tokenize("") == []
    assert tok.tokenize("abxxb") == ["▁", "ab", "<unk>", "b"]  # the run "xx" is one fused unknown piece


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30))
def test_pretokenize_equals_metaspace(text):
    hf = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    assert [w for w, _ in hf.pre_tokenize_str(text)] == pretokenize(text)


def test_roundtrip_and_errors(trained, corpus, tmp_path):
    trained.save(tmp_path / "ug.json")
    again = load_tokenizer(tmp_path / "ug.json")
    assert again.pieces == trained.pieces
    text = corpus[0][:12] + " To be"
    assert trained.decode(trained.encode(text)) == text
    with pytest.raises(ValueError, match="byte_fallback needs the 256 byte pieces"):
        UnigramTokenizer([("<unk>", 0.0), ("a", -1.0)], byte_fallback=True)
    with pytest.raises(ValueError, match="vocab_size must hold"):
        UnigramTokenizer.train(["abcdefg"], vocab_size=3)
    with pytest.raises(ValueError, match="shrinking_factor must be in"):
        UnigramTokenizer.train(["abc"], vocab_size=30, shrinking_factor=1.0)


def test_pickle_round_trip(trained, corpus):
    import pickle

    again = pickle.loads(pickle.dumps(trained))
    assert type(again) is UnigramTokenizer and again.encode(corpus[1]) == trained.encode(corpus[1])


@pytest.fixture(scope="module")
def with_fallback(corpus) -> UnigramTokenizer:
    return UnigramTokenizer.train(corpus[:30], 1400, byte_fallback=True, seed_size=500)


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="▁"), max_size=30)
       .filter(lambda s: not s.startswith(" ")))
def test_byte_fallback_round_trip_on_any_text(with_fallback, text):
    # SentencePiece's decoding drops the one prepended space, so a text that itself starts with a space is excluded
    ids = with_fallback.encode(text)
    assert with_fallback.decode(ids) == text
    assert with_fallback.unk_id not in ids
