"""companion.lm_basics: n-gram probabilities and perplexity derived by hand, distributions that sum to 1,
and a neural bigram model that reaches the maximum-likelihood bigram loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from companion.lm_basics import (
    BOS,
    EOS,
    UNK,
    MLPLanguageModel,
    MLPLMConfig,
    NGramConfig,
    NGramLM,
    context_windows,
    perplexity_from_nll,
)

# Two training sentences. Padded for a bigram model: <s> a b </s> and <s> a </s>.
# Bigram counts: (<s>,a)=2, (a,b)=1, (a,</s>)=1, (b,</s>)=1. Vocabulary: a, b, </s>, <unk> (V = 4).
CORPUS = [["a", "b"], ["a"]]


def bigram(smoothing, **kw):
    return NGramLM(NGramConfig(order=2, smoothing=smoothing, **kw)).fit(CORPUS)


def test_vocabulary():
    assert bigram("add_k").vocab == ["a", "b", EOS, UNK]


def test_min_count_maps_rare_tokens_to_unk():
    # "b" occurs once: with min_count=2 it becomes <unk>, so (a, <unk>) = 1 and V = {a, </s>, <unk>} = 3.
    lm = NGramLM(NGramConfig(order=2, smoothing="add_k", min_count=2)).fit(CORPUS)
    assert lm.vocab == ["a", EOS, UNK]
    assert lm.prob("b", ["a"]) == lm.prob(UNK, ["a"]) == pytest.approx((1 + 1) / (2 + 3))
    with pytest.raises(ValueError, match="min_count must be an int >= 1, got 0"):
        NGramConfig(min_count=0)


def test_unk_rate_and_its_effect_on_perplexity():
    # Held-out "a b z z" has 4 tokens, "z" unseen: rate 2/4. With min_count=2, "b" is UNK too: 3/4.
    held_out = [["a", "b", "z", "z"]]
    assert bigram("add_k").unk_rate(held_out) == 0.5
    lm2 = NGramLM(NGramConfig(order=2, smoothing="add_k", min_count=2)).fit(CORPUS)
    assert lm2.unk_rate(held_out) == 0.75
    # Merging b into UNK makes the held-out text *more* probable under add-1: b|a is 1/3 with V=4, while UNK|a
    # is (1+1)/(2+3) = 2/5 with V=3; the coarser vocabulary lowers perplexity without a better model.
    assert lm2.perplexity(held_out) < bigram("add_k").perplexity(held_out)
    with pytest.raises(ValueError, match="corpus is empty: the UNK rate"):
        lm2.unk_rate([[]])


def test_add_one_bigram_by_hand():
    lm = bigram("add_k", k=1.0)
    # P(w | h) = (c(h, w) + 1) / (c(h) + V), c(h) = number of bigrams starting with h, V = 4.
    assert lm.prob("a", [BOS]) == pytest.approx((2 + 1) / (2 + 4))  # 1/2
    assert lm.prob("b", ["a"]) == pytest.approx((1 + 1) / (2 + 4))  # 1/3
    assert lm.prob("a", ["b"]) == pytest.approx((0 + 1) / (1 + 4))  # 1/5
    assert lm.prob(EOS, ["b"]) == pytest.approx((1 + 1) / (1 + 4))  # 2/5
    assert lm.prob("z", ["a"]) == lm.prob(UNK, ["a"]) == pytest.approx(1 / 6)  # unseen token -> <unk>
    assert lm.prob("a", ["q"]) == pytest.approx(1 / 4)  # unseen history: c(h) = 0 -> uniform 1/V
    assert lm.prob("a") == lm.prob("a", [BOS])  # an empty context is the start of a sentence


def test_add_one_perplexity_five_tokens_by_hand():
    lm = bigram("add_k", k=1.0)
    # "a b a b" predicts 5 tokens: a|<s>, b|a, a|b, b|a, </s>|b
    # p = 1/2 * 1/3 * 1/5 * 1/3 * 2/5 = 2/450 = 1/225, perplexity = 225 ** (1/5) = 2.95418...
    logp, n = lm.sentence_log_prob(["a", "b", "a", "b"])
    assert n == 5
    assert logp == pytest.approx(math.log(1 / 225))
    assert lm.perplexity([["a", "b", "a", "b"]]) == pytest.approx(225 ** (1 / 5))
    assert 225 ** (1 / 5) == pytest.approx(2.95418, abs=1e-5)


def test_kneser_ney_bigram_by_hand():
    lm = bigram("kneser_ney", discount=0.5)
    # Unigram level, continuation counts N1+(. w): a:1 (<s>), b:1 (a), </s>:2 (a, b), <unk>:0;
    # N1+(. .) = 4 bigram types, 3 tokens with a non-zero count. With D = 1/2 and uniform 1/V = 1/4:
    # P1(w) = max(N1+(. w) - D, 0) / 4 + D * 3 / 4 * 1/4  -> a, b: 0.21875; </s>: 0.46875; <unk>: 0.09375
    p1 = {"a": 0.21875, "b": 0.21875, EOS: 0.46875, UNK: 0.09375}
    assert sum(p1.values()) == 1.0
    # Bigram level after "a": c(a) = 2, 2 types (b, </s>), each seen once:
    # P(b | a) = (1 - 1/2) / 2 + (1/2) * 2 / 2 * P1(b) = 0.25 + 0.5 * 0.21875 = 0.359375
    assert lm.prob("b", ["a"]) == pytest.approx(0.359375)
    # P(a | a) = 0 + 0.5 * P1(a) = 0.109375 (unseen bigram, backed-off mass)
    assert lm.prob("a", ["a"]) == pytest.approx(0.109375)
    # An unseen history falls through to the unigram level.
    assert lm.prob(EOS, ["zzz"]) == pytest.approx(p1[EOS])


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("smoothing", ["add_k", "kneser_ney"])
def test_distributions_sum_to_one(order, smoothing):
    corpus = [list("abcab"), list("bca"), list("aab"), list("c")]
    lm = NGramLM(NGramConfig(order=order, smoothing=smoothing, k=0.5, discount=0.75)).fit(corpus)
    contexts = [[], ["a"], ["b", "c"], ["c", "a", "b"], ["x", "y", "z"], [BOS, "a"]]
    for context in contexts:
        dist = lm.distribution(context)
        assert set(dist) == set(lm.vocab)
        assert sum(dist.values()) == pytest.approx(1.0, abs=1e-12)
        assert min(dist.values()) > 0  # smoothing leaves no zero: unseen tokens included


def test_kneser_ney_beats_add_one_on_held_out_text():
    # A bigram-structured toy language: after 'a' comes 'b' and after 'b' comes 'c', mostly.
    train = [list("abcabcab"), list("bcabca"), list("cabcab"), list("abcb")]
    held_out = [list("abcabc"), list("bcab")]
    add_one = NGramLM(NGramConfig(order=2, smoothing="add_k", k=1.0)).fit(train)
    kn = NGramLM(NGramConfig(order=2, smoothing="kneser_ney")).fit(train)
    # Add-one spreads mass onto the many unseen bigrams; Kneser-Ney discounts only 0.75 per type.
    assert kn.perplexity(held_out) < add_one.perplexity(held_out)


def test_errors():
    with pytest.raises(ValueError, match="order must be an int >= 1, got 0"):
        NGramConfig(order=0)
    with pytest.raises(ValueError, match="smoothing must be .* got 'witten_bell'"):
        NGramConfig(smoothing="witten_bell")
    with pytest.raises(ValueError, match="discount must be in \\(0, 1\\], got 1.5"):
        NGramConfig(discount=1.5)
    with pytest.raises(ValueError, match="k must be positive"):
        NGramConfig(k=0)
    with pytest.raises(RuntimeError, match="not fitted"):
        NGramLM().prob("a")
    with pytest.raises(ValueError, match="corpus is empty"):
        NGramLM().fit([])
    with pytest.raises(ValueError, match="reserved"):
        NGramLM().fit([["a", EOS]])
    with pytest.raises(ValueError, match="never predicted"):
        bigram("add_k").prob(BOS, ["a"])
    with pytest.raises(ValueError, match="corpus is empty"):
        bigram("add_k").perplexity([])
    with pytest.raises(ValueError, match="mean_nll must be .* got -1.0"):
        perplexity_from_nll(-1.0)
    with pytest.raises(ValueError, match="d_embed must be a positive int, got 0"):
        MLPLMConfig(vocab_size=4, d_embed=0)
    with pytest.raises(ValueError, match=r"expected ids of shape \(B, 2\), got \(3, 1\)"):
        MLPLanguageModel(MLPLMConfig(vocab_size=4, context=2))(torch.zeros(3, 1, dtype=torch.long))


def test_context_windows_by_hand():
    x, y = context_windows([5, 6, 7], context=2, pad_id=0)
    assert x.tolist() == [[0, 0], [0, 5], [5, 6]]
    assert y.tolist() == [5, 6, 7]


def test_perplexity_from_nll():
    assert perplexity_from_nll(math.log(225) / 5) == pytest.approx(225 ** (1 / 5))
    assert perplexity_from_nll(0.0) == 1.0


def test_neural_bigram_reaches_the_maximum_likelihood_bigram_loss():
    # The lowest training cross-entropy any bigram model can reach is that of the count estimate
    # P(w | h) = c(h, w) / c(h), i.e. the empirical conditional entropy H(next | previous).
    torch.manual_seed(0)
    ids = [0, 1, 2, 1, 2, 3, 1, 2, 1, 0, 2, 3, 3, 1, 2, 0] * 4
    x, y = context_windows(ids, context=1, pad_id=4)  # (T, 1), (T,)
    counts = torch.zeros(5, 5)
    for h, w in zip(x[:, 0].tolist(), y.tolist()):
        counts[h, w] += 1
    mle = counts / counts.sum(1, keepdim=True).clamp(min=1)
    h_min = -torch.log(mle[x[:, 0], y]).mean().item()
    model = MLPLanguageModel(MLPLMConfig(vocab_size=5, context=1, d_embed=8, d_hidden=32))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(200):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = F.cross_entropy(model(x), y).item()
    assert final >= h_min - 1e-4  # cannot beat the count estimate on its own training data
    assert final == pytest.approx(h_min, abs=0.02)  # and gets there
