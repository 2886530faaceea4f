"""Multiple-choice evaluation by log-likelihood, as benchmark harnesses score it (Gao et al., lm-evaluation-harness;
Brown et al., 2020, sec. 2.4): each choice is a *continuation* of the question, scored by the sum of the model's
log-probabilities of its tokens given the question; the prediction is the choice with the highest score.

``acc`` uses the raw sum, which favours short choices; the harness's ``acc_norm`` divides by the choice's length
in characters; dividing by UTF-8 bytes or by tokens are the other conventions in use. For Chinese (3 bytes per
common character) characters and bytes differ by a constant factor only when every character is Chinese.
The continuation's tokens are those of ``encode(question + choice)`` after ``encode(question)`` (the harness's
split, right for BPE merges across the boundary); a too-long input is cut on the left, as the harness does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

NORMALISATIONS = ("none", "chars", "bytes", "tokens")


@dataclass(frozen=True)
class MultipleChoice:
    question: str  # the context the choices continue
    choices: tuple[str, ...]  # the candidate continuations
    answer: int  # index of the correct choice

    def __post_init__(self) -> None:
        if len(self.choices) < 2:
            raise ValueError(f"a question needs at least 2 choices, got {list(self.choices)!r}")
        if any(not c for c in self.choices):
            raise ValueError(f"choices must be non-empty strings, got {list(self.choices)!r}")
        if not 0 <= self.answer < len(self.choices):
            raise ValueError(f"answer must index one of the {len(self.choices)} choices, got {self.answer!r}")


def split_continuation(encode: Callable[[str], list[int]], question: str, choice: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids): ``encode(question + choice)`` split after ``len(encode(question))``."""
    context = list(encode(question))
    whole = list(encode(question + choice))
    if whole[:len(context)] != context or len(whole) == len(context):
        raise ValueError(f"the tokens of {question!r} are not a prefix of those of question + {choice!r}")
    return context, whole[len(context):]


@torch.no_grad()
def continuation_logprobs(model: nn.Module, context: Sequence[int], continuations: Sequence[Sequence[int]],
                          max_length: int, pad_id: int = 0) -> list[float]:
    """Sum of log P(continuation tokens | context) for each continuation, in one right-padded batch
    (a causal model: padding after a sequence does not change its logits). Float32 at least."""
    if len(context) < 1:
        raise ValueError("context must hold at least one token (e.g. a beginning-of-text token)")
    rows, spans = [], []
    for cont in continuations:
        if not 1 <= len(cont) <= max_length:
            raise ValueError(f"a continuation must have 1..max_length={max_length} tokens, got {len(cont)}")
        full = (list(context) + list(cont))[-(max_length + 1):]  # cut on the left, as the harness does
        rows.append(full[:-1])
        spans.append((len(full) - 1 - len(cont), full[-len(cont):]))
    T = max(len(r) for r in rows)
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (K, T)
    for k, r in enumerate(rows):
        x[k, :len(r)] = torch.tensor(r)
    logits = model(x)  # (K, T, V)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (K, T, V)
    out = []
    for k, (first, targets) in enumerate(spans):
        pos = torch.arange(first, first + len(targets))  # logits at position t predict token t + 1
        out.append(float(logp[k, pos, torch.tensor(targets)].sum()))
    return out


@dataclass(frozen=True)
class ChoiceScores:
    logprobs: np.ndarray  # (N, K): summed log-probability of each choice
    tokens: np.ndarray  # (N, K): tokens of each choice
    chars: np.ndarray  # (N, K): characters of each choice
    bytes: np.ndarray  # (N, K): UTF-8 bytes of each choice
    answers: np.ndarray  # (N,): index of the correct choice

    def scores(self, norm: str = "none") -> np.ndarray:
        """(N, K) scores: the sum, or the sum divided by characters, bytes or tokens."""
        if norm not in NORMALISATIONS:
            raise ValueError(f"norm must be one of {NORMALISATIONS}, got {norm!r}")
        div = {"none": 1.0, "chars": self.chars, "bytes": self.bytes, "tokens": self.tokens}[norm]
        return self.logprobs / div

    def predictions(self, norm: str = "none") -> np.ndarray:
        """(N,) argmax of :meth:`scores` (first index on ties, as ``numpy.argmax``)."""
        return self.scores(norm).argmax(axis=1)

    def accuracy(self, norm: str = "none") -> float:
        """``acc`` (norm="none"), ``acc_norm`` (norm="chars", the harness's), or by bytes/tokens."""
        return float(np.mean(self.predictions(norm) == self.answers))

    def probabilities(self, norm: str = "none") -> np.ndarray:
        """(N, K) softmax over the choices of :meth:`scores`: the model's confidence in each choice."""
        s = self.scores(norm)
        e = np.exp(s - s.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform random guess: mean of 1 / K."""
        return float(np.mean(1.0 / np.full(len(self.answers), self.logprobs.shape[1])))


def score_multiple_choice(model: nn.Module, encode: Callable[[str], list[int]], items: Sequence[MultipleChoice],
                          max_length: int, prefix_ids: Sequence[int] = (), pad_id: int = 0) -> ChoiceScores:
    """Score every choice of every item (all items with the same number of choices); ``prefix_ids`` (e.g. a
    beginning-of-text token) go before each question. ``model``: ids (B, T) -> logits (B, T, V), eval mode."""
    if len(items) == 0:
        raise ValueError("no questions to score")
    ks = {len(it.choices) for it in items}
    if len(ks) != 1:
        raise ValueError(f"all questions must have the same number of choices, got {sorted(ks)}")
    was_training = model.training
    model.eval()
    lp, tok, ch, by = [], [], [], []
    for it in items:
        pieces = [split_continuation(encode, it.question, c) for c in it.choices]
        context = list(prefix_ids) + pieces[0][0]
        lp.append(continuation_logprobs(model, context, [p[1] for p in pieces], max_length, pad_id))
        tok.append([len(p[1]) for p in pieces])
        ch.append([len(c) for c in it.choices])
        by.append([len(c.encode("utf-8")) for c in it.choices])
    model.train(was_training)
    return ChoiceScores(np.array(lp), np.array(tok), np.array(ch), np.array(by),
                        np.array([it.answer for it in items]))
