"""Perplexity and bits per token, character and byte of a causal language model, with sliding windows for texts
longer than its context: the "perplexity of fixed-length models" method of the Hugging Face documentation.

A window of ``window`` tokens moves by ``stride``; each window scores only the tokens not scored by an earlier
window, so every token is scored once, with at least ``window - stride`` tokens of context (stride = window: the
text is cut into independent chunks and the first token of each chunk is not scored; stride < window: every
token after the first is scored). Perplexity per *token* depends on the tokenizer — a character model and a BPE
model predict different events — while the total log-likelihood of a text does not: dividing it by the text's
characters or UTF-8 bytes (bits per character/byte, log base 2) gives numbers that compare across tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

LN2 = math.log(2)


@dataclass(frozen=True)
class PerplexityResult:
    nll: float  # total negative log-likelihood of the scored tokens, in nats
    tokens: int  # number of scored tokens
    characters: int  # characters of the scored texts
    bytes: int  # UTF-8 bytes of the scored texts
    unscored: int = 0  # text tokens left unscored (the first of each chunk when stride = window)

    @property
    def perplexity(self) -> float:
        """exp(mean NLL per token): depends on the tokenizer."""
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_token(self) -> float:
        return self.nll / self.tokens / LN2

    def _check_complete(self) -> None:
        if self.unscored:
            raise ValueError(f"{self.unscored} tokens were not scored (stride = window cuts the text into chunks "
                             "whose first token has no context): per-character and per-byte figures would "
                             "leave them out; use stride < window")

    @property
    def bits_per_character(self) -> float:
        """Total NLL in bits / characters: comparable across tokenizers."""
        self._check_complete()
        return self.nll / self.characters / LN2

    @property
    def bits_per_byte(self) -> float:
        """Total NLL in bits / UTF-8 bytes (3 per common Chinese character)."""
        self._check_complete()
        return self.nll / self.bytes / LN2


def window_spans(n_tokens: int, window: int, stride: int | None = None, start: int = 1) -> list[tuple[int, int, int]]:
    """``(begin, end, first_scored)`` for each window over ``n_tokens`` ids: the model reads ids[begin:end] and
    scores positions first_scored .. end-1 (position t is predicted from ids[begin:t]). Positions before
    ``start`` (>= 1: position 0 has no context) are context only."""
    stride = window if stride is None else stride
    if window < 2:
        raise ValueError(f"window must be >= 2 (one context token and one target), got {window!r}")
    if not 1 <= stride <= window:
        raise ValueError(f"stride must be in 1..window={window}, got {stride!r}")
    if start < 1:
        raise ValueError(f"start must be >= 1 (position 0 has no context), got {start!r}")
    spans, prev_end, begin = [], start, 0
    while prev_end < n_tokens:
        end = min(begin + window, n_tokens)
        first = max(prev_end, begin + 1)
        if first < end:
            spans.append((begin, end, first))
        prev_end = max(prev_end, end)
        begin += stride
    return spans


@torch.no_grad()
def sequence_nll(model: nn.Module, ids: Sequence[int], window: int, stride: int | None = None,
                 start: int = 1) -> tuple[float, int]:
    """(total NLL in nats, scored tokens) of one id sequence under ``model`` (ids (1, T) -> logits (1, T, V)),
    by :func:`window_spans`; log-softmax in the model's dtype promoted to at least float32."""
    ids_t = torch.as_tensor(list(ids), dtype=torch.long)  # (N,)
    total, count = 0.0, 0
    for begin, end, first in window_spans(len(ids_t), window, stride, start):
        x = ids_t[begin:end][None]  # (1, T)
        logits = model(x)[0]  # (T, V)
        logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (T, V)
        rows = torch.arange(first - 1 - begin, end - 1 - begin)  # positions whose logits predict first..end-1
        targets = ids_t[first:end]  # (n,)
        total -= float(logp[rows, targets].sum())
        count += end - first
    return total, count


def evaluate_perplexity(model: nn.Module, encode: Callable[[str], list[int]], texts: Sequence[str], window: int,
                        stride: int | None = None, prefix_ids: Sequence[int] = ()) -> PerplexityResult:
    """Score every token of every text: each text is ``prefix_ids`` (e.g. a beginning-of-text token, at least
    one) followed by ``encode(text)``; the prefix is context only. Characters and bytes count the texts."""
    if isinstance(texts, str) or len(texts) == 0:
        raise ValueError("texts must be a non-empty sequence of strings")
    if len(prefix_ids) < 1:
        raise ValueError("prefix_ids must hold at least one token (e.g. <eos> or <bos>) so that the first token "
                         f"of a text is scored too, got {list(prefix_ids)!r}")
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise ValueError(f"texts {empty[:10]} are empty")
    nll, tokens, chars, n_bytes, unscored = 0.0, 0, 0, 0, 0
    for text in texts:
        ids = list(prefix_ids) + list(encode(text))
        total, n = sequence_nll(model, ids, window, stride, start=len(prefix_ids))
        nll, tokens, unscored = nll + total, tokens + n, unscored + len(ids) - len(prefix_ids) - n
        chars, n_bytes = chars + len(text), n_bytes + len(text.encode("utf-8"))
    return PerplexityResult(nll, tokens, chars, n_bytes, unscored)
