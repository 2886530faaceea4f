"""Sliding-window perplexity: stride = window equals independent chunks, a token-by-token float64 computation
agrees, a smaller stride never scores worse when context helps, bits per character/byte from the same total."""

import math

import pytest
import torch
from torch import nn

from companion.evaluation import evaluate_perplexity, sequence_nll, window_spans
from companion.models import GPT, GPTConfig


def tiny_gpt(seed=0, n_ctx=32, vocab=24):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab, n_ctx=n_ctx, n_layers=2, d_model=32, n_heads=4)).double().eval()


class PeriodicOracle(nn.Module):
    """Predicts token t + 1 = token t + 1 - P when that token is inside the window, else uniform: more context
    can only help on a text of period P."""

    def __init__(self, vocab: int, period: int) -> None:
        super().__init__()
        self.vocab, self.period = vocab, period

    def forward(self, ids):  # (B, T) -> (B, T, V)
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab, dtype=torch.float64)
        for t in range(self.period - 1, T):
            logits[torch.arange(B), t, ids[:, t + 1 - self.period]] = 20.0
        return logits


@torch.no_grad()
def direct_nll(model, ids, window, stride, start=1):
    """Token by token: position t is predicted from the window that scores it, one forward per token."""
    total = 0.0
    for begin, end, first in window_spans(len(ids), window, stride, start):
        for t in range(first, end):
            logits = model(torch.tensor([ids[begin:t]]))[0, -1]  # (V,)
            total -= float(torch.log_softmax(logits.double(), -1)[ids[t]])
    return total


def test_window_spans_score_every_token_once():
    for n in (2, 5, 17, 40):
        for window in (2, 3, 8):
            for stride in range(1, window + 1):
                spans = window_spans(n, window, stride)
                scored = [t for _, end, first in spans for t in range(first, end)]
                if stride < window:
                    assert scored == list(range(1, n))
                else:  # independent chunks: the first token of each chunk has no context
                    assert scored == [t for t in range(1, n) if t % window != 0]
                assert all(end - begin <= window and begin < first for begin, end, first in spans)


@torch.no_grad()
def test_stride_equal_window_is_independent_chunks():
    model = tiny_gpt()
    ids = torch.randint(0, 24, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    total, n = sequence_nll(model, ids, window=16, stride=16)
    expected, count = 0.0, 0
    for s in range(0, 70, 16):
        chunk = torch.tensor([ids[s:s + 16]])
        logp = torch.log_softmax(model(chunk)[0], -1)  # (T, V)
        expected -= float(logp[torch.arange(chunk.shape[1] - 1), chunk[0, 1:]].sum())
        count += chunk.shape[1] - 1
    assert n == count and total == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("stride", [1, 5, 16])
def test_equals_token_by_token_float64(stride):
    model = tiny_gpt(seed=2)
    ids = torch.randint(0, 24, (45,), generator=torch.Generator().manual_seed(3)).tolist()
    total, _ = sequence_nll(model, ids, window=16, stride=stride, start=3)
    assert total == pytest.approx(direct_nll(model, ids, 16, stride, start=3), rel=1e-10)


def test_smaller_stride_never_scores_worse_when_context_helps():
    period, window = 5, 8
    model = PeriodicOracle(vocab=10, period=period)
    ids = [0] + [1 + t % period for t in range(60)]  # 61 ids, period 5 after the first
    means = {}
    for stride in range(1, window + 1):
        total, n = sequence_nll(model, ids, window, stride)
        means[stride] = total / n
    assert all(means[a] <= means[b] + 1e-12 for a in means for b in means if a < b), means
    assert means[1] < means[window] - 0.5  # and strictly better than independent chunks


def test_bits_per_character_and_byte():
    model = tiny_gpt(seed=4)
    encode = lambda s: [ord(c) % 20 + 4 for c in s]  # noqa: E731  a "character tokenizer"
    texts = ["床前明月光", "hello world, it is a long line of text"]
    r = evaluate_perplexity(model, encode, texts, window=16, stride=8, prefix_ids=[0])
    assert r.tokens == r.characters == sum(map(len, texts)) and r.unscored == 0
    assert r.bytes == sum(len(t.encode()) for t in texts) == 15 + 38
    assert r.perplexity == pytest.approx(math.exp(r.nll / r.tokens))
    assert r.bits_per_character == pytest.approx(r.nll / math.log(2) / r.characters)
    assert r.bits_per_byte == pytest.approx(r.bits_per_character * r.characters / r.bytes)
    # the prefix is context only: the same NLL as summing the text's tokens after it by hand
    by_hand = sum(direct_nll(model, [0] + encode(t), 16, 8) for t in texts)
    assert r.nll == pytest.approx(by_hand, rel=1e-10)
    chunks = evaluate_perplexity(model, encode, texts, window=16, stride=16, prefix_ids=[0])
    assert chunks.unscored == 2  # positions 16 and 32 of the long text (39 ids with the prefix) start chunks
    with pytest.raises(ValueError, match="2 tokens were not scored"):
        chunks.bits_per_character


def test_bad_input():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="stride must be in 1..window=8, got 9"):
        sequence_nll(model, [1, 2, 3], window=8, stride=9)
    with pytest.raises(ValueError, match="window must be >= 2"):
        window_spans(5, 1)
    with pytest.raises(ValueError, match="prefix_ids must hold at least one token"):
        evaluate_perplexity(model, lambda s: [1] * len(s), ["ab"], window=8)
    with pytest.raises(ValueError, match=r"texts \[1\] are empty"):
        evaluate_perplexity(model, lambda s: [1] * len(s), ["ab", ""], window=8, prefix_ids=[0])
