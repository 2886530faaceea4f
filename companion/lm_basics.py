"""Language-model basics: a count-based n-gram LM, perplexity, and a tiny neural (Bengio-style MLP) LM.

Smoothing: add-k (Laplace for k=1; Jurafsky & Martin, SLP3 ch. 3) or interpolated Kneser-Ney with one
absolute discount D (Kneser & Ney 1995; the interpolated form of Chen & Goodman 1998): lower orders use
continuation counts N1+(. h w), the recursion ends in the uniform distribution over the vocabulary, so
every token, seen or not, gets a non-zero probability and each conditional distribution sums to 1.
The neural model follows Bengio et al. 2003: embed the previous ``context`` tokens, concatenate, one tanh
hidden layer, a softmax over the vocabulary (``context=1`` is a neural bigram model).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

BOS = "<s>"  # padding on the left of every sentence; context only, never predicted
EOS = "</s>"  # end of sentence; predicted like any token
UNK = "<unk>"  # every token not seen in training


@dataclass(frozen=True)
class NGramConfig:
    """How to count and smooth."""

    order: int = 2  # n: predict each token from the n - 1 tokens before it
    smoothing: str = "kneser_ney"  # "add_k" or "kneser_ney"
    k: float = 1.0  # pseudo-count for add-k (1.0 = Laplace)
    discount: float = 0.75  # absolute discount D for Kneser-Ney, 0 < D <= 1
    min_count: int = 1  # training tokens seen fewer times than this are counted as UNK

    def __post_init__(self) -> None:
        if isinstance(self.order, bool) or not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"order must be an int >= 1, got {self.order!r}")
        if self.smoothing not in ("add_k", "kneser_ney"):
            raise ValueError(f"smoothing must be 'add_k' or 'kneser_ney', got {self.smoothing!r}")
        if not (isinstance(self.k, (int, float)) and self.k > 0 and math.isfinite(self.k)):
            raise ValueError(f"k must be positive and finite, got {self.k!r}")
        if not (isinstance(self.discount, (int, float)) and 0 < self.discount <= 1):
            raise ValueError(f"discount must be in (0, 1], got {self.discount!r}")
        if isinstance(self.min_count, bool) or not isinstance(self.min_count, int) or self.min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {self.min_count!r}")


class _Table:
    """Counts of next tokens after one context, with their total and number of distinct types."""

    __slots__ = ("counts", "total", "types")

    def __init__(self, counts: Counter) -> None:
        self.counts = counts
        self.total = sum(counts.values())
        self.types = len(counts)


class NGramLM:
    """Count-based n-gram language model over sequences of string tokens (characters, words, ...)."""

    def __init__(self, config: NGramConfig = NGramConfig()) -> None:
        self.config = config
        self.vocab: list[str] = []
        self._index: dict[str, int] = {}
        self._tables: list[dict[tuple[str, ...], _Table]] = []  # [m] for m-gram counts, m = 1..n

    @property
    def order(self) -> int:
        return self.config.order

    def _pad(self, sentence: Sequence[str]) -> list[str]:
        return [BOS] * (self.order - 1) + [t if t in self._index else UNK for t in sentence] + [EOS]

    def fit(self, corpus: Iterable[Sequence[str]]) -> NGramLM:
        """Count n-grams of every sentence in ``corpus`` (each sentence is padded with n-1 BOS and one EOS);
        tokens rarer than ``min_count`` become UNK, so UNK gets real counts."""
        corpus = [list(s) for s in corpus]
        if not corpus:
            raise ValueError("corpus is empty: nothing to count")
        for sentence in corpus:
            for token in sentence:
                if token in (BOS, EOS, UNK):
                    raise ValueError(f"token {token!r} is reserved; found it inside a training sentence")
        frequency = Counter(t for s in corpus for t in s)
        self.vocab = sorted(t for t, c in frequency.items() if c >= self.config.min_count) + [EOS, UNK]
        self._index = {t: i for i, t in enumerate(self.vocab)}
        n = self.order
        counts: list[defaultdict] = [defaultdict(Counter) for _ in range(n + 1)]
        for sentence in corpus:
            padded = self._pad(sentence)
            for i in range(n - 1, len(padded)):
                counts[n][tuple(padded[i - n + 1 : i])][padded[i]] += 1
        if self.config.smoothing == "kneser_ney":
            # Lower orders count distinct left extensions: N1+(. h w) = |{x : c(x h w) > 0}|.
            for m in range(n - 1, 0, -1):
                for context, table in counts[m + 1].items():
                    for token in table:
                        counts[m][context[1:]][token] += 1
        self._tables = [{c: _Table(t) for c, t in level.items()} for level in counts]
        return self

    def _check_fitted(self) -> None:
        if not self.vocab:
            raise RuntimeError("the model is not fitted: call fit(corpus) first")

    def prob(self, token: str, context: Sequence[str] = ()) -> float:
        """P(token | last n-1 tokens of ``context``); unknown tokens count as UNK, a short context is
        padded with BOS (the start of a sentence)."""
        self._check_fitted()
        if token == BOS:
            raise ValueError(f"{BOS!r} is never predicted; it only pads contexts")
        token = token if token in self._index else UNK
        ctx = [BOS] * (self.order - 1) + [t if t in self._index or t == BOS else UNK for t in context]
        ctx = tuple(ctx[len(ctx) - (self.order - 1) :])
        if self.config.smoothing == "add_k":
            table = self._tables[self.order].get(ctx)
            count = table.counts.get(token, 0) if table else 0
            total = table.total if table else 0
            return (count + self.config.k) / (total + self.config.k * len(self.vocab))
        return self._kneser_ney(token, ctx, self.order)

    def _kneser_ney(self, token: str, ctx: tuple[str, ...], m: int) -> float:
        if m == 0:
            return 1.0 / len(self.vocab)
        table = self._tables[m].get(ctx[len(ctx) - (m - 1) :] if m > 1 else ())
        lower = self._kneser_ney(token, ctx, m - 1)
        if table is None:  # history never seen: all mass goes to the lower order
            return lower
        d = self.config.discount
        return max(table.counts.get(token, 0) - d, 0.0) / table.total + d * table.types / table.total * lower

    def distribution(self, context: Sequence[str] = ()) -> dict[str, float]:
        """P(w | context) for every w in the vocabulary (sums to 1)."""
        self._check_fitted()
        return {w: self.prob(w, context) for w in self.vocab}

    def sentence_log_prob(self, sentence: Sequence[str]) -> tuple[float, int]:
        """(natural-log probability of the sentence including its EOS, number of predicted tokens)."""
        self._check_fitted()
        padded = self._pad(sentence)
        n = self.order
        logp = sum(math.log(self.prob(padded[i], padded[i - n + 1 : i])) for i in range(n - 1, len(padded)))
        return logp, len(padded) - (n - 1)

    def unk_rate(self, corpus: Iterable[Sequence[str]]) -> float:
        """Fraction of the tokens of ``corpus`` (EOS excluded) outside the vocabulary, i.e. scored as UNK.

        Perplexities are comparable only at the same vocabulary: a larger ``min_count`` maps more rare tokens to
        the one UNK event, which is easier to predict than the tokens it replaces, so perplexity falls."""
        self._check_fitted()
        tokens = [t for sentence in corpus for t in sentence]
        if not tokens:
            raise ValueError("corpus is empty: the UNK rate is undefined")
        return sum(t not in self._index for t in tokens) / len(tokens)

    def perplexity(self, corpus: Iterable[Sequence[str]]) -> float:
        """exp(-(1/N) sum log P(w_i | history)) over every predicted token (EOS included) of ``corpus``."""
        total_logp, total_n = 0.0, 0
        for sentence in corpus:
            logp, count = self.sentence_log_prob(sentence)
            total_logp += logp
            total_n += count
        if total_n == 0:
            raise ValueError("corpus is empty: perplexity is undefined")
        return math.exp(-total_logp / total_n)


def perplexity_from_nll(mean_nll: float) -> float:
    """Perplexity from a mean negative log-likelihood in nats per token: exp(NLL)."""
    if not math.isfinite(mean_nll) or mean_nll < 0:
        raise ValueError(f"mean_nll must be a non-negative finite number of nats, got {mean_nll!r}")
    return math.exp(mean_nll)


def context_windows(ids: Sequence[int], context: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (previous ``context`` ids, next id) pair of one sequence, left-padded with ``pad_id``.

    Returns X of shape (T, context) and Y of shape (T,), T = len(ids).
    """
    if context < 1:
        raise ValueError(f"context must be >= 1, got {context!r}")
    padded = [pad_id] * context + list(ids)
    x = torch.tensor([padded[i : i + context] for i in range(len(ids))], dtype=torch.long).view(-1, context)  # (T, context)
    y = torch.tensor(list(ids), dtype=torch.long)  # (T,)
    return x, y


@dataclass(frozen=True)
class MLPLMConfig:
    """Sizes of the MLP language model."""

    vocab_size: int  # V, including any padding/BOS id
    context: int = 1  # tokens of history (1 = neural bigram)
    d_embed: int = 32  # embedding width per token
    d_hidden: int = 128  # hidden units of the tanh layer

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context", "d_embed", "d_hidden"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")


class MLPLanguageModel(nn.Module):
    """Bengio et al. 2003: logits = W2 tanh(W1 [e(x_1); ...; e(x_context)] + b1) + b2."""

    def __init__(self, config: MLPLMConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_embed)
        self.hidden = nn.Linear(config.context * config.d_embed, config.d_hidden)
        self.out = nn.Linear(config.d_hidden, config.vocab_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, context) token ids -> logits (B, V)."""
        if x.dim() != 2 or x.shape[1] != self.config.context:
            raise ValueError(f"expected ids of shape (B, {self.config.context}), got {tuple(x.shape)}")
        e = self.embed(x).flatten(1)  # (B, context * d_embed)
        return self.out(torch.tanh(self.hidden(e)))  # (B, V)
