"""Evaluating Tang-poem language models: the *form* of generated poems and a perplexity that a character
model and chapter 2's n-gram models can be compared on.

* :func:`poem_form` / :func:`form_adherence`: a regulated poem (绝句, 律诗) has clauses (句) of equally many
  characters, 5 (五言) or 7 (七言); the share of samples whose clauses all have 5, or all 7, characters is a
  simple, automatic measure of whether a model learned the form (it says nothing about tones or rhyme).
* :func:`sample_poems`: ancestral sampling (temperature 1 draws from the model's own distribution) with a KV
  cache and an explicit generator, by inverse CDF, so that a float64 model gives the same poems on every CPU.
* :func:`comparable_perplexity`: chapter 2 scores each line of a poem on its own, over a closed vocabulary
  (``companion.lm_basics.NGramLM``: characters seen ``min_count`` times, ``</s>`` ending the line, ``<unk>``
  for every other character). A model over a larger vocabulary is scored on the *same* events by summing
  its probabilities: P(``<unk>``) = the mass of every character outside that vocabulary (and of the model's
  own unknown/padding tokens), P(``</s>``) = P(line break) + P(end of poem). Perplexities over the same
  events and the same tokens are comparable; over different vocabularies they are not.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Sequence

import torch
from torch import nn

CLAUSE_END = "，。？！；：、,.?!;:"  # punctuation that ends a clause (句)
FORMS = (5, 7)  # 五言, 七言
_SPLIT = re.compile(f"[{re.escape(CLAUSE_END)}\\s]+")


def poem_clauses(text: str) -> list[str]:
    """The clauses of ``text``: the pieces between punctuation marks and line breaks (empty ones dropped)."""
    return [c for c in _SPLIT.split(text) if c]


def poem_form(text: str, min_clauses: int = 4) -> int | None:
    """5 or 7 if ``text`` has at least ``min_clauses`` clauses and all of them have 5 (or all 7) characters,
    else None. A regulated quatrain (绝句) has 4 clauses, an eight-line poem (律诗) 8."""
    if min_clauses < 1:
        raise ValueError(f"min_clauses must be >= 1, got {min_clauses!r}")
    lengths = {len(c) for c in poem_clauses(text)}
    n = len(poem_clauses(text))
    if n >= min_clauses and len(lengths) == 1 and (size := lengths.pop()) in FORMS:
        return size
    return None


def form_adherence(poems: Iterable[str], min_clauses: int = 4) -> float:
    """Share of ``poems`` whose clauses all have 5, or all 7, characters (:func:`poem_form` not None)."""
    poems = list(poems)
    if not poems:
        raise ValueError("form_adherence needs at least one poem")
    return sum(poem_form(p, min_clauses) is not None for p in poems) / len(poems)


@torch.no_grad()
def sample_poems(model: nn.Module, tokenizer, n: int, max_new_tokens: int = 100, temperature: float = 1.0,
                 prompt: str = "", bos: str = "<eos>", eos: str = "<eos>", seed: int = 0) -> list[str]:
    """``n`` texts sampled from a decoder-only ``model`` (``model(ids, kv_caches=...)`` -> logits (B, T, V), and
    ``model.config.n_layers``), each starting after ``bos`` + ``prompt`` and ending at ``eos`` (not included) or
    after ``max_new_tokens``. Token t is drawn from softmax(logits / temperature) by inverse CDF with one
    ``torch.Generator`` seeded by ``seed``: with a float64 model the draws are the same on every CPU."""
    from companion.nn import KVCache

    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"n and max_new_tokens must be >= 1, got n={n!r}, max_new_tokens={max_new_tokens!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    start = [tokenizer.token_id(bos)] + tokenizer.encode(prompt)
    n_ctx = model.config.n_ctx
    if len(start) + max_new_tokens - 1 > n_ctx:  # the last sampled token is never fed back
        raise ValueError(f"{len(start)} start tokens + max_new_tokens={max_new_tokens} exceed the context length "
                         f"n_ctx={n_ctx}: use max_new_tokens <= {n_ctx - len(start) + 1}")
    eos_id = tokenizer.token_id(eos)
    was_training = model.training
    model.eval()
    g = torch.Generator().manual_seed(seed)
    caches = [KVCache() for _ in range(model.config.n_layers)]
    step_input = torch.tensor([start] * n)  # (n, T0)
    out = torch.empty(n, 0, dtype=torch.long)  # (n, t): the sampled tokens
    done = torch.zeros(n, dtype=torch.bool)  # (n,)
    for _ in range(max_new_tokens):
        logits = model(step_input, kv_caches=caches)[:, -1]  # (n, V)
        cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)  # (n, V)
        u = torch.rand(n, 1, generator=g, dtype=cdf.dtype) * cdf[:, -1:]  # (n, 1)
        token = torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1)  # (n, 1)
        token = token.masked_fill(done[:, None], eos_id)
        done |= token[:, 0] == eos_id
        out = torch.cat([out, token], dim=1)
        step_input = token
        if bool(done.all()):
            break
    model.train(was_training)
    texts = []
    for row in out.tolist():
        row = row[:row.index(eos_id)] if eos_id in row else row
        texts.append(prompt + tokenizer.decode(row))
    return texts


# ------------------------------------------------------------------------- perplexity on chapter 2's events
def comparable_perplexity(model: nn.Module, tokenizer, lines: Sequence[Sequence[str]], known: Collection[str],
                          bos: str = "<eos>", line_ends: Sequence[str] = ("\n", "<eos>"),
                          batch_size: int = 256) -> float:
    """Perplexity of a character language model on ``lines``, each scored alone (after ``bos`` only), over
    chapter 2's events: every character of ``known`` (a closed vocabulary, e.g. ``NGramLM.vocab``), one
    "unknown character" event, and one end-of-line event, predicted after the last character.

    ``model(ids)`` must return logits (B, T, V) over ``tokenizer``'s vocabulary (a character tokenizer: one id
    per character or special token, ``decode([i])`` its text). A character outside ``known`` is scored with the
    summed probability of all tokens that are neither in ``known`` nor a line end; the end of a line with the
    summed probability of ``line_ends``. The inputs are the true characters (the model sees them even where
    chapter 2's models see ``<unk>``). Computed in float64; returns exp(mean negative log-probability).
    """
    known = {c for c in known if len(c) == 1}  # characters only: "</s>" and "<unk>" are the other two events
    V = tokenizer.vocab_size
    tokens = [tokenizer.decode([i]) for i in range(V)]
    index = {t: i for i, t in enumerate(tokens)}
    absent = [t for t in (bos, *line_ends) if t not in index]
    if absent:
        raise ValueError(f"tokens {absent!r} are not in the model's vocabulary")
    end_ids = [index[t] for t in line_ends]
    is_other = torch.tensor([t not in known for t in tokens])  # (V,): the "unknown character" event ...
    is_other[end_ids] = False  # ... minus the line ends
    missing = sorted(c for c in known if c not in index)
    if missing:
        raise ValueError(f"{len(missing)} characters of the closed vocabulary are not in the model's vocabulary, "
                         f"e.g. {missing[:5]}: their events cannot be scored")
    bos_id = index[bos]
    total, count = 0.0, 0
    model.eval()
    for start in range(0, len(lines), batch_size):
        chunk = [list(line) for line in lines[start:start + batch_size]]
        T = 1 + max(len(line) for line in chunk)
        ids = torch.full((len(chunk), T), bos_id, dtype=torch.long)  # (B, T): bos, then the characters
        for b, line in enumerate(chunk):
            if line:
                ids[b, 1:1 + len(line)] = torch.tensor(tokenizer.encode("".join(line)))  # (len,)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).double(), dim=-1)  # (B, T, V)
        for b, line in enumerate(chunk):
            for t in range(len(line) + 1):  # position t predicts character t (t = len: the end of the line)
                row = logp[b, t]  # (V,)
                if t == len(line):
                    lp = torch.logsumexp(row[end_ids], 0)
                elif line[t] in known:
                    lp = row[index[line[t]]]
                else:
                    lp = torch.logsumexp(row[is_other], 0)
                total -= float(lp)
                count += 1
    if count == 0:
        raise ValueError("no lines to score")
    return math.exp(total / count)
