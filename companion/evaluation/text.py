"""Corpus-level text metrics: BLEU (Papineni et al., 2002), chrF (Popović, 2015) and ROUGE-1/2/L (Lin, 2004).

* BLEU is implemented here (clipped n-gram counts summed over the corpus, geometric mean of the 1..4-gram
  precisions, brevity penalty against the closest reference length, ties to the shorter one) with sacrebleu's
  conventions: its default "exp" smoothing and its *tokenizer classes reused* ("13a" for English, "zh" which
  splits every Chinese character off, "none" for whitespace only): the numbers equal ``sacrebleu.corpus_bleu``.
* chrF sums character n-gram statistics (1..6, whitespace removed, beta = 2) over the corpus, then averages
  precision and recall over the orders, as ``sacrebleu.corpus_chrf``.
* ROUGE scores one prediction against one target; ``tokenize="default"`` reimplements ``rouge_score``'s tokenizer
  (lower-case, keep ``[a-z0-9]+`` only: it deletes every Chinese character), ``tokenize="zh"`` makes each CJK
  character a token (and each run of Latin letters/digits a word), so Chinese is scored at all.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

BLEU_TOKENIZERS = ("13a", "zh", "none")
ROUGE_TOKENIZERS = ("default", "zh")
_ROUGE_DEFAULT = re.compile(r"[a-z0-9]+")
_ROUGE_ZH = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[a-z0-9]+")


def _check_corpus(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]]) -> list[list[str]]:
    if isinstance(hypotheses, str):
        raise ValueError("hypotheses must be a sequence of strings, got one string")
    if len(hypotheses) != len(references):
        raise ValueError(f"hypotheses and references must have the same length, got {len(hypotheses)} and "
                         f"{len(references)}")
    if len(hypotheses) == 0:
        raise ValueError("empty corpus: need at least one hypothesis and its references")
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    empty = [i for i, r in enumerate(refs) if not r]
    if empty:
        raise ValueError(f"hypotheses {empty[:10]} have no reference")
    return refs


def bleu_tokenizer(name: str):
    """sacrebleu's tokenizer object for ``name`` (reused, not reimplemented): a callable str -> str."""
    if name == "13a":
        from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
        return Tokenizer13a()
    if name == "zh":
        from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh
        return TokenizerZh()
    if name == "none":
        from sacrebleu.tokenizers.tokenizer_none import NoneTokenizer
        return NoneTokenizer()
    raise ValueError(f"tokenize must be one of {BLEU_TOKENIZERS}, got {name!r}")


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """Counts of the n-grams (tuples) of ``tokens``."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


@dataclass(frozen=True)
class BLEUResult:
    score: float  # 0..100
    precisions: tuple[float, ...]  # the n-gram precisions (0..100), smoothed where a count is 0
    brevity_penalty: float  # exp(1 - r / c) if c < r else 1
    hyp_len: int  # c: tokens in all hypotheses
    ref_len: int  # r: sum of the closest reference lengths


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], tokenize: str = "13a",
                max_order: int = 4, smooth: str = "exp") -> BLEUResult:
    """Corpus BLEU of ``hypotheses[i]`` against ``references[i]`` (a string or a list of strings)."""
    if smooth not in ("exp", "none"):
        raise ValueError(f"smooth must be 'exp' or 'none', got {smooth!r}")
    if max_order < 1:
        raise ValueError(f"max_order must be >= 1, got {max_order!r}")
    refs = _check_corpus(hypotheses, references)
    tok = bleu_tokenizer(tokenize)
    correct, total = [0] * max_order, [0] * max_order
    hyp_len = ref_len = 0
    for hyp, rs in zip(hypotheses, refs):
        h = tok(hyp.rstrip()).split()
        r_tokens = [tok(r.rstrip()).split() for r in rs]
        hyp_len += len(h)
        ref_len += min((abs(len(h) - len(r)), len(r)) for r in r_tokens)[1]  # closest, ties -> shorter
        for n in range(1, max_order + 1):
            h_counts = ngrams(h, n)
            clip: Counter = Counter()
            for r in r_tokens:
                clip |= ngrams(r, n)  # max count of each n-gram over the references
            correct[n - 1] += sum(min(c, clip[g]) for g, c in h_counts.items())
            total[n - 1] += max(len(h) - n + 1, 0)
    bp = 1.0 if hyp_len >= ref_len else (math.exp(1 - ref_len / hyp_len) if hyp_len > 0 else 0.0)
    precisions = [0.0] * max_order
    if not any(correct):
        return BLEUResult(0.0, tuple(precisions), bp, hyp_len, ref_len)
    divisor = 1.0
    for n in range(max_order):
        if total[n] == 0:
            break
        if correct[n] == 0 and smooth == "exp":  # NIST smoothing: 1 / (2^k * total) for the k-th zero count
            divisor *= 2
            precisions[n] = 100.0 / (divisor * total[n])
        else:
            precisions[n] = 100.0 * correct[n] / total[n]
    if min(precisions) == 0.0:
        return BLEUResult(0.0, tuple(precisions), bp, hyp_len, ref_len)
    score = bp * math.exp(sum(math.log(p) for p in precisions) / max_order)
    return BLEUResult(score, tuple(precisions), bp, hyp_len, ref_len)


def _chrf_stats(hyp: str, ref: str, order: int) -> list[tuple[int, int, int]]:
    hyp, ref = "".join(hyp.split()), "".join(ref.split())  # whitespace is not part of any character n-gram
    stats = []
    for n in range(1, order + 1):
        h, r = Counter(hyp[i:i + n] for i in range(len(hyp) - n + 1)), Counter(ref[i:i + n] for i in range(len(ref) - n + 1))
        match = sum(min(c, r[g]) for g, c in h.items())
        stats.append((sum(h.values()) if r else 0, sum(r.values()), match))  # sacrebleu: no hits without a ref
    return stats


def _chrf_from_stats(stats: Sequence[tuple[int, int, int]], beta: float) -> float:
    precisions, recalls = [], []
    for n_hyp, n_ref, n_match in stats:
        if n_hyp > 0 and n_ref > 0:  # orders with no n-grams on either side are left out of the averages
            precisions.append(n_match / n_hyp)
            recalls.append(n_match / n_ref)
    if not precisions:
        return 0.0
    p, r = sum(precisions) / len(precisions), sum(recalls) / len(recalls)
    if p + r == 0:
        return 0.0
    return 100 * (1 + beta**2) * p * r / (beta**2 * p + r)


def corpus_chrf(hypotheses: Sequence[str], references: Sequence[str | Sequence[str]], order: int = 6,
                beta: float = 2.0) -> float:
    """Corpus chrF (0..100): per sentence the reference with the best sentence chrF, statistics summed."""
    if order < 1 or beta <= 0:
        raise ValueError(f"order must be >= 1 and beta > 0, got order={order!r}, beta={beta!r}")
    refs = _check_corpus(hypotheses, references)
    summed = [[0, 0, 0] for _ in range(order)]
    for hyp, rs in zip(hypotheses, refs):
        best = max((_chrf_stats(hyp, r, order) for r in rs), key=lambda s: _chrf_from_stats(s, beta))
        for acc, s in zip(summed, best):
            for k in range(3):
                acc[k] += s[k]
    return _chrf_from_stats([tuple(s) for s in summed], beta)


# ----------------------------------------------------------------------------------------------- ROUGE
def rouge_tokens(text: str, tokenize: str = "zh") -> list[str]:
    """Tokens for ROUGE: "default" is ``rouge_score``'s tokenizer (lower-case, ``[a-z0-9]+`` runs only);
    "zh" also keeps every CJK character as a token of its own."""
    if tokenize == "default":
        return _ROUGE_DEFAULT.findall(text.lower())
    if tokenize == "zh":
        return _ROUGE_ZH.findall(text.lower())
    raise ValueError(f"tokenize must be one of {ROUGE_TOKENIZERS}, got {tokenize!r}")


@dataclass(frozen=True)
class RougeScore:
    precision: float  # overlap / prediction length
    recall: float  # overlap / target length
    fmeasure: float  # 2 P R / (P + R), 0 when both are 0


def _score(overlap: int, n_pred: int, n_target: int) -> RougeScore:
    p, r = overlap / max(n_pred, 1), overlap / max(n_target, 1)
    return RougeScore(p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, O(len(a) len(b)))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge(target: str, prediction: str, kind: str = "rouge1", tokenize: str = "zh") -> RougeScore:
    """ROUGE-1, ROUGE-2 (``kind="rouge2"``) or ROUGE-L (``"rougeL"``) of ``prediction`` against ``target``,
    in ``rouge_score``'s argument order and definitions (no stemming)."""
    t, p = rouge_tokens(target, tokenize), rouge_tokens(prediction, tokenize)
    if kind == "rougeL":
        if not t or not p:
            return RougeScore(0.0, 0.0, 0.0)
        return _score(lcs_length(t, p), len(p), len(t))
    match = re.fullmatch(r"rouge([1-9])", kind)
    if match is None:
        raise ValueError(f"kind must be 'rouge1'..'rouge9' or 'rougeL', got {kind!r}")
    n = int(match.group(1))
    tn, pn = ngrams(t, n), ngrams(p, n)
    return _score(sum(min(c, pn[g]) for g, c in tn.items()), sum(pn.values()), sum(tn.values()))
