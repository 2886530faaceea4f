"""Tokenizers pickle (``Dataset.map(num_proc>1)``, spawn-started ``DataLoader`` workers) and come back encoding and
decoding exactly as before, also after their caches and the ``tokenizers`` fast path were used."""

import copy
import multiprocessing
import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from companion.tokenization import BPETokenizer, CharTokenizer, load_gpt2_tokenizer

MIXED = "床前明月光，疑是地上霜。Hello, world! 🙂🚀 naïve café — 123 <pad> 李白\n\t end"
CORPUS = [MIXED, "举头望明月，低头思故乡。", "The quick brown fox 🦊 jumps over the lazy dog.", "😀😃😄 你好 hello"] * 3


def _bpe() -> BPETokenizer:
    return BPETokenizer.train(CORPUS, vocab_size=300, special_tokens=["<pad>", "<eos>"])


def _char() -> CharTokenizer:
    return CharTokenizer.train(CORPUS, special_tokens=["<pad>", "<unk>"])


_BPE = _bpe()
TOKENIZERS = {"bpe": _bpe, "char": _char, "gpt2": load_gpt2_tokenizer}


@pytest.fixture(scope="module", params=sorted(TOKENIZERS))
def tokenizer(request):
    tok = TOKENIZERS[request.param]()
    tok.encode(MIXED)  # fill the chunk cache before pickling
    if isinstance(tok, BPETokenizer):
        tok.encode_many([MIXED])  # and build the tokenizers fast path
    return tok


def test_pickle_round_trip_encodes_and_decodes_the_same(tokenizer):
    again = pickle.loads(pickle.dumps(tokenizer))
    assert type(again) is type(tokenizer) and again.to_dict() == tokenizer.to_dict()
    ids = tokenizer.encode(MIXED)
    assert again.encode(MIXED) == ids
    assert again.decode(ids) == tokenizer.decode(ids)
    assert again.special_tokens == tokenizer.special_tokens and again.vocab_size == tokenizer.vocab_size
    if isinstance(tokenizer, BPETokenizer):
        assert again.decode(ids) == MIXED
        assert again.encode_many(CORPUS[:4]) == [tokenizer.encode(t) for t in CORPUS[:4]]
    assert copy.deepcopy(tokenizer).encode(MIXED) == ids


@settings(max_examples=50, deadline=None)
@given(st.text(max_size=40))
def test_unpickled_bpe_round_trips_any_text(text):
    tok = pickle.loads(pickle.dumps(_BPE))
    assert tok.encode(text) == _BPE.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_spawned_worker_encodes_like_the_parent():
    """A spawn-context pool (what DataLoader workers use on macOS/Windows, and CUDA code everywhere) has to
    pickle the tokenizer into a fresh interpreter; one worker is enough to show it."""
    tok = _bpe()
    texts = CORPUS[:4]
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        assert pool.map(tok.encode, texts) == [tok.encode(t) for t in texts]
