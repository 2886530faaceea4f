"""WordPiece: greedy longest-match-first encoding equals tokenizers' WordPiece model given the same vocabulary;
training scores pairs by count(ab) / (count(a) count(b))."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers, trainers

from companion.data import load_shakespeare
from companion.tokenization import WordPieceTokenizer, load_tokenizer
from companion.tokenization.wordpiece import pretokenize

EXTRA = ["naïve café, 123,456 𝔘𝔫𝔦 ok!! — «quoted» 床前明月光，疑是地上霜。", "x" * 150, "Hello\tworld\n\nagain"]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    text = load_shakespeare()["text"][0][:30000]
    return text.split("\n")


@pytest.fixture(scope="module")
def trained(corpus) -> WordPieceTokenizer:
    return WordPieceTokenizer.train(corpus, 600, special_tokens=["[UNK]", "[CLS]", "[SEP]"])


def test_encoding_equals_tokenizers_wordpiece(trained):
    hf = trained.to_hf()
    held_out = load_shakespeare()["text"][1][:8000].split("\n") + EXTRA
    for text in held_out:
        assert hf.encode(text).ids == trained.encode(text), text


def test_encoding_equals_tokenizers_on_its_own_trained_vocab(corpus):
    hf = HFTokenizer(models.WordPiece(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    hf.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=500, special_tokens=["[UNK]"],
                                                              show_progress=False))
    vocab = sorted(hf.get_vocab(), key=hf.get_vocab().get)
    ours = WordPieceTokenizer(vocab)
    for text in load_shakespeare()["text"][2][:5000].split("\n") + EXTRA:
        assert hf.encode(text).ids == ours.encode(text), text


def test_split_cjk_equals_bert_normalizer_and_pretokenizer():
    from companion.data import load_tang_poems

    poems = load_tang_poems()["text"][:150]
    tok = WordPieceTokenizer.train(poems + ["To be, or not to be: that is the question."] * 3, 3000, split_cjk=True)
    assert all(not p.startswith("##") or not "\u4e00" <= p[2] <= "\u9fff" for p in tok.vocab)  # no CJK inside words
    hf = tok.to_hf()
    for text in load_tang_poems()["text"][300:340] + EXTRA + ["BERT 的中文模型按字切分：龘𠀀"]:
        assert hf.encode(text).ids == tok.encode(text), text
    assert tok.tokenize("明月光") == ["明", "月", "光"]


# tokenizers' Rust punctuation table is older than the Unicode data of the `regex` module: it misses punctuation
# added since Unicode 9 (U+2E43 onwards, Balinese and Telugu signs...) and still counts U+166D, an `So` since
# Unicode 12. Below U+2E00 these are the only assigned code points on which the two disagree (found by a full scan).
NEWER_PUNCTUATION = "\u061d\u09fd\u0a76\u0c77\u0c84\u166d\u1b7d\u1b7e"


@settings(max_examples=60, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x2DFF, blacklist_categories=("Cs", "Cn"),
                                      blacklist_characters=NEWER_PUNCTUATION), max_size=40))
def test_pretokenize_equals_bert_pretokenizer(text):
    hf = pre_tokenizers.BertPreTokenizer()
    assert [w for w, _ in hf.pre_tokenize_str(text)] == pretokenize(text)


def test_greedy_longest_match_by_hand():
    tok = WordPieceTokenizer(["[UNK]", "un", "##aff", "##able", "##a", "a", "##ff"])
    assert tok.tokenize("unaffable") == ["un", "##aff", "##able"]
    assert tok.tokenize("unx") == ["[UNK]"]  # no piece matches the rest: the whole word is unknown
    assert tok.decode(tok.encode("unaffable a")) == "unaffable a"


def test_training_picks_highest_likelihood_score():
    # piece counts: h=15, p=17, b=4, ##u=36, ##g=20, ##n=16, ##s=5; the score, not the raw count, decides
    texts = ["hug"] * 10 + ["pug"] * 5 + ["pun"] * 12 + ["bun"] * 4 + ["hugs"] * 5
    tok = WordPieceTokenizer.train(texts, vocab_size=11, special_tokens=["[UNK]"])
    # alphabet: [UNK] + b h p ##g ##n ##s ##u = 8, so three merges; the first is ##g ##s: 5 / (20 * 5) = 0.05,
    # higher than every pair with ##u, e.g. the most frequent ##u ##g (20 / (36 * 20) = 0.028)
    assert tok.vocab[8] == "##gs"
    assert tok.vocab_size == 11


def test_roundtrip_and_errors(trained, tmp_path):
    trained.save(tmp_path / "wp.json")
    again = load_tokenizer(tmp_path / "wp.json")
    assert again.vocab == trained.vocab and again.encode("To be, or not") == trained.encode("To be, or not")
    with pytest.raises(ValueError, match="unk_token '\\[UNK\\]' is not in the vocabulary"):
        WordPieceTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="vocab_size must hold"):
        WordPieceTokenizer.train(["abcdef"], vocab_size=3)


def test_pickle_round_trip(trained):
    import pickle

    again = pickle.loads(pickle.dumps(trained))
    text = "To be, or not to be: that is the question."
    assert type(again) is WordPieceTokenizer and again.encode(text) == trained.encode(text)
