"""Corpus hygiene: cleaning, exact and near-duplicate detection, heuristic quality filters, contamination checks.

Near duplicates: MinHash (Broder, 1997) estimates the Jaccard similarity of two documents' sets of character
n-grams ("shingles"); LSH banding (Leskovec, Rajaraman & Ullman, *Mining of Massive Datasets*, ch. 3) cuts the
k = b * r MinHash values into b bands of r rows, so that a pair of similarity s shares at least one band, and
becomes a candidate, with probability 1 - (1 - s^r)^b. Candidates are then verified with the exact Jaccard
similarity (Lee et al., 2022 use the same recipe on C4). The heuristic filters are character-level versions of the
Gopher rules (Rae et al., 2021), as FineWeb (Penedo et al., 2024) applies them; the contamination check counts
eval n-grams seen in training (GPT-3's 13-gram test, Brown et al., 2020), here on characters for Chinese.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

MERSENNE_PRIME = (1 << 31) - 1  # p of the universal hash family h(x) = (a x + b) mod p
NOTE_PATTERN = re.compile(r"（[^（）]*）|\([^()]*\)")  # an editor's note in full- or half-width brackets (innermost)
PUNCT_PATTERN = re.compile(r"[\s，。？！；：、“”‘’《》（）()·,.?!;:'\"-]")  # punctuation and whitespace dropped by fingerprint


# ------------------------------------------------------------------------------------------------ cleaning
def clean_poem(text: str) -> str:
    """NFC-normalise, delete bracketed editor's notes (innermost first, so nested ones go too), strip each line
    and drop lines left empty or with punctuation only (a note's closing "。")."""
    text = unicodedata.normalize("NFC", text)
    while (stripped := NOTE_PATTERN.sub("", text)) != text:
        text = stripped
    return "\n".join(line.strip() for line in text.split("\n") if fingerprint(line))


def fingerprint(text: str) -> str:
    """The text without punctuation and whitespace: equal fingerprints = duplicates up to punctuation."""
    return PUNCT_PATTERN.sub("", text)


def duplicate_groups(keys: Sequence[str]) -> list[list[int]]:
    """Indices of equal keys (texts or fingerprints), groups of two or more, in order of first occurrence."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, key in enumerate(keys):
        groups[key].append(i)
    return [g for g in groups.values() if len(g) > 1]


# ------------------------------------------------------------------------------------------- MinHash + LSH
def shingles(text: str, n: int = 5) -> set[str]:
    """The set of character n-grams of ``text`` (the whole text if it is shorter than ``n``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    if len(text) <= n:
        return {text}
    return {text[i:i + n] for i in range(len(text) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|A ∩ B| / |A ∪ B| (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


@dataclass(frozen=True)
class MinHashConfig:
    """MinHash signatures cut into LSH bands."""

    num_perm: int = 128  # k: hash functions, i.e. values per signature
    bands: int = 32  # b: LSH bands; rows per band r = num_perm // bands
    ngram: int = 5  # shingle length in characters
    seed: int = 0  # seeds the hash functions' (a, b) coefficients

    def __post_init__(self) -> None:
        if self.num_perm < 1:
            raise ValueError(f"num_perm must be >= 1, got {self.num_perm!r}")
        if self.bands < 1 or self.num_perm % self.bands:
            raise ValueError(f"bands must divide num_perm (got bands={self.bands!r}, num_perm={self.num_perm!r})")
        if self.ngram < 1:
            raise ValueError(f"ngram must be >= 1, got {self.ngram!r}")

    @property
    def rows(self) -> int:
        return self.num_perm // self.bands


def lsh_probability(similarity: float | np.ndarray, bands: int, rows: int) -> float | np.ndarray:
    """Probability that a pair of Jaccard similarity s becomes an LSH candidate: 1 - (1 - s^r)^b."""
    return 1.0 - (1.0 - np.asarray(similarity, dtype=np.float64) ** rows) ** bands


class MinHasher:
    """k hash functions h_i(x) = (a_i x + b_i) mod p over 32-bit shingle hashes (CRC-32, stable across runs);
    a signature holds min over the shingles of each h_i, and P[sig_i(A) = sig_i(B)] = J(A, B)."""

    def __init__(self, config: MinHashConfig = MinHashConfig()) -> None:
        self.config = config
        rng = np.random.default_rng(config.seed)
        self.a = rng.integers(1, MERSENNE_PRIME, size=(config.num_perm, 1), dtype=np.uint64)  # (k, 1)
        self.b = rng.integers(0, MERSENNE_PRIME, size=(config.num_perm, 1), dtype=np.uint64)  # (k, 1)

    def signature_of_set(self, items: set[str]) -> np.ndarray:
        """(k,) uint64 signature of a set of strings."""
        if not items:
            raise ValueError("cannot MinHash an empty set")
        x = np.fromiter((zlib.crc32(s.encode("utf-8")) for s in items), dtype=np.uint64, count=len(items))
        x %= np.uint64(MERSENNE_PRIME)  # (m,) below p, so a * x < 2^62 fits in uint64
        return ((self.a * x[None, :] + self.b) % np.uint64(MERSENNE_PRIME)).min(axis=1)  # (k,)

    def signature(self, text: str) -> np.ndarray:
        """(k,) signature of the text's character shingles."""
        return self.signature_of_set(shingles(text, self.config.ngram))

    def signatures(self, texts: Sequence[str]) -> np.ndarray:
        """(N, k) signatures of ``texts``."""
        return np.stack([self.signature(t) for t in texts]) if len(texts) else np.empty((0, self.config.num_perm),
                                                                                        dtype=np.uint64)


def estimated_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Fraction of equal signature entries: an unbiased estimate of J with standard error sqrt(J (1-J) / k)."""
    if sig_a.shape != sig_b.shape:
        raise ValueError(f"signatures differ in shape: {sig_a.shape} vs {sig_b.shape}")
    return float(np.mean(sig_a == sig_b))


def lsh_candidates(signatures: np.ndarray, bands: int) -> set[tuple[int, int]]:
    """Pairs (i < j) of rows of ``signatures`` (N, k) that agree on all rows of at least one band."""
    n, k = signatures.shape
    if bands < 1 or k % bands:
        raise ValueError(f"bands must divide the signature length (got bands={bands!r}, k={k})")
    r = k // bands
    pairs: set[tuple[int, int]] = set()
    for band in range(bands):
        buckets: dict[bytes, list[int]] = defaultdict(list)
        block = np.ascontiguousarray(signatures[:, band * r:(band + 1) * r])  # (N, r)
        for i in range(n):
            buckets[block[i].tobytes()].append(i)
        for members in buckets.values():
            for x in range(len(members)):
                for y in range(x + 1, len(members)):
                    pairs.add((members[x], members[y]))
    return pairs


def near_duplicate_pairs(texts: Sequence[str], threshold: float = 0.8, config: MinHashConfig = MinHashConfig()
                         ) -> list[tuple[int, int, float]]:
    """LSH candidates whose exact shingle Jaccard is at least ``threshold``: sorted (i, j, J) with i < j."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    sets = [shingles(t, config.ngram) for t in texts]
    hasher = MinHasher(config)
    sigs = np.stack([hasher.signature_of_set(s) for s in sets]) if sets else np.empty((0, config.num_perm))
    out = []
    for i, j in sorted(lsh_candidates(sigs, config.bands)):
        similarity = jaccard(sets[i], sets[j])
        if similarity >= threshold:
            out.append((i, j, similarity))
    return out


def clusters(n: int, pairs: Sequence[tuple[int, ...]]) -> list[list[int]]:
    """Connected components (size >= 2) of the graph on ``range(n)`` whose edges are ``pairs`` (union-find)."""
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i, j, *_ in pairs:
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(n):
        groups[find(i)].append(i)
    return [g for g in groups.values() if len(g) > 1]


# ------------------------------------------------------------------------------------------ quality filters
@dataclass(frozen=True)
class QualityConfig:
    """Thresholds of character-level Gopher-style rules (Rae et al., 2021, appendix A); a text failing any is
    dropped. Gopher counts words; for Chinese, which has no spaces, characters play their part here."""

    min_chars: int = 10  # fewer non-space characters: too short to be a document
    max_chars: int = 100_000  # more: likely a dump, not a document
    max_symbol_ratio: float = 0.4  # share of characters neither letters nor digits (3-character verse lines: 1/3)
    max_duplicate_line_fraction: float = 0.3  # share of lines that repeat an earlier line (Gopher: 0.3)
    max_top_ngram_fraction: float = 0.2  # share of characters in the most frequent repeated n-gram (Gopher 2-gram: 0.2)
    top_ngram: int = 2  # n of that rule
    min_distinct_char_ratio: float = 0.1  # distinct / all characters; lower means one character repeated

    def __post_init__(self) -> None:
        if not 0 < self.min_chars <= self.max_chars:
            raise ValueError(f"need 0 < min_chars <= max_chars, got {self.min_chars!r}, {self.max_chars!r}")
        for name in ("max_symbol_ratio", "max_duplicate_line_fraction", "max_top_ngram_fraction",
                     "min_distinct_char_ratio"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")
        if self.top_ngram < 1:
            raise ValueError(f"top_ngram must be >= 1, got {self.top_ngram!r}")


def quality_signals(text: str, n: int = 2) -> dict[str, float]:
    """The measured quantities behind :func:`quality_failures`."""
    chars = [c for c in text if not c.isspace()]
    lines = [line.strip() for line in text.split("\n") if line.strip()]
    symbols = sum(not (c.isalpha() or c.isdigit()) for c in chars)
    seen: set[str] = set()
    repeated = 0
    for line in lines:
        repeated += line in seen
        seen.add(line)
    body = "".join(chars)
    grams = Counter(body[i:i + n] for i in range(len(body) - n + 1))
    count = grams.most_common(1)[0][1] if grams else 0
    top = count * n / len(body) if count > 1 else 0.0  # an n-gram seen once is no repetition (short texts)
    return {
        "chars": float(len(chars)),
        "symbol_ratio": symbols / len(chars) if chars else 0.0,
        "duplicate_line_fraction": repeated / len(lines) if lines else 0.0,
        "top_ngram_fraction": min(top, 1.0),
        "distinct_char_ratio": len(set(chars)) / len(chars) if chars else 0.0,
    }


def quality_failures(text: str, config: QualityConfig = QualityConfig()) -> list[str]:
    """Names of the rules ``text`` breaks (empty list: keep it)."""
    s = quality_signals(text, config.top_ngram)
    failures = []
    if s["chars"] < config.min_chars:
        failures.append("too_short")
    if s["chars"] > config.max_chars:
        failures.append("too_long")
    if s["symbol_ratio"] > config.max_symbol_ratio:
        failures.append("symbols")
    if s["duplicate_line_fraction"] > config.max_duplicate_line_fraction:
        failures.append("duplicate_lines")
    if s["top_ngram_fraction"] > config.max_top_ngram_fraction:
        failures.append("top_ngram")
    if s["distinct_char_ratio"] < config.min_distinct_char_ratio:
        failures.append("few_distinct_chars")
    return failures


# ------------------------------------------------------------------------------------------- contamination
def char_ngrams(text: str, n: int) -> set[str]:
    """All character n-grams of ``text`` (empty if it is shorter than ``n``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    return {text[i:i + n] for i in range(len(text) - n + 1)}


@dataclass(frozen=True)
class ContaminationReport:
    """How much of an evaluation set already occurs, n-gram by n-gram, in the training set."""

    n: int  # n-gram length in characters
    overlap: tuple[float, ...]  # per eval document: share of its n-grams that occur in training
    contaminated: tuple[bool, ...]  # per eval document: overlap > the threshold it was computed with

    @property
    def rate(self) -> float:
        """Share of eval documents flagged as contaminated."""
        return sum(self.contaminated) / len(self.contaminated) if self.contaminated else 0.0


def contamination(train_texts: Sequence[str], eval_texts: Sequence[str], n: int = 13, threshold: float = 0.0
                  ) -> ContaminationReport:
    """Flag eval documents whose share of n-grams found in ``train_texts`` exceeds ``threshold`` (``0.0``: any
    shared n-gram, GPT-3's rule). The eval n-grams are indexed and the training texts streamed past them, so
    memory grows with the (small) eval set only. Documents shorter than ``n`` have overlap 0."""
    if not 0 <= threshold < 1:
        raise ValueError(f"threshold must be in [0, 1), got {threshold!r}")
    eval_grams = [char_ngrams(t, n) for t in eval_texts]
    wanted = set().union(*eval_grams) if eval_grams else set()
    found: set[str] = set()
    for text in train_texts:
        for i in range(len(text) - n + 1):
            gram = text[i:i + n]
            if gram in wanted:
                found.add(gram)
    overlap = tuple(len(g & found) / len(g) if g else 0.0 for g in eval_grams)
    return ContaminationReport(n, overlap, tuple(o > threshold for o in overlap))


# ------------------------------------------------------------------------------------- a corpus, end to end
def deduplicate(texts: Sequence[str], threshold: float = 0.7, config: MinHashConfig = MinHashConfig()
                ) -> list[int]:
    """Indices of ``texts`` to keep, ascending: the first of each group of equal :func:`fingerprint`, then the
    first of each cluster of near duplicates (MinHash-LSH candidates on the fingerprints whose exact shingle
    Jaccard is at least ``threshold``, joined by :func:`clusters`)."""
    first: dict[str, int] = {}
    for i, text in enumerate(texts):
        first.setdefault(fingerprint(text), i)
    unique = sorted(first.values())
    pairs = near_duplicate_pairs([fingerprint(texts[i]) for i in unique], threshold, config)
    dropped = {unique[i] for cluster in clusters(len(unique), pairs) for i in cluster[1:]}
    return [i for i in unique if i not in dropped]


def decontaminate(texts: Sequence[str], split_of: Sequence[str], n: int = 13, train: str = "train"
                  ) -> list[str]:
    """``split_of`` with every held-out text (split other than ``train``) that shares a character n-gram of its
    :func:`fingerprint` with a training text moved into ``train``; repeated until no held-out text does (a
    moved text can share an n-gram with another held-out one). The texts are kept, not dropped."""
    if len(texts) != len(split_of):
        raise ValueError(f"texts and split_of differ in length: {len(texts)} vs {len(split_of)}")
    split_of = list(split_of)
    prints = [fingerprint(t) for t in texts]
    new_train = [i for i, s in enumerate(split_of) if s == train]
    while True:
        held = [i for i, s in enumerate(split_of) if s != train]
        report = contamination([prints[i] for i in new_train], [prints[i] for i in held], n=n)
        new_train = [i for i, bad in zip(held, report.contaminated) if bad]
        if not new_train:
            return split_of
        for i in new_train:
            split_of[i] = train
