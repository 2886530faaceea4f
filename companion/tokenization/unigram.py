"""Unigram language-model tokenization (Kudo, 2018), as in SentencePiece (Kudo & Richardson, 2018); the tokenizer
family of T5 (Raffel et al., 2020) and, with byte fallback, LLaMA-1/2 (Touvron et al., 2023).

A word's segmentation is the most probable sequence of pieces, found by Viterbi over the lattice of vocabulary
matches; a character outside the vocabulary becomes ``<unk>`` (score: lowest piece score - 10, consecutive
unknowns fused) or, with ``byte_fallback``, its UTF-8 bytes ``<0xNN>``, exactly as ``tokenizers``' ``Unigram``
model does (tested). Pre-tokenization is SentencePiece's: spaces become ``▁``, one ``▁`` is prepended, and the
text is split before each ``▁``. Training is EM in the simplified form of the paper: seed pieces (all characters
and the most frequent substrings), then repeatedly re-estimate probabilities from expected counts
(forward-backward) and drop the pieces whose removal costs the least likelihood, until ``vocab_size`` is reached.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

from companion.tokenization.base import Tokenizer, check_text

SPACE = "▁"  # U+2581, SentencePiece's visible space
UNK_PENALTY = 10.0  # an unknown character scores (lowest piece score - UNK_PENALTY), as in SentencePiece
BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))


def pretokenize(text: str) -> list[str]:
    """SentencePiece's words: ``"a b"`` -> ``["▁a", "▁b"]`` (spaces replaced by ``▁``, one prepended unless the
    text already starts with one; the empty text has no words), as ``tokenizers``' ``Metaspace``."""
    text = check_text(text).replace(" ", SPACE)
    if not text:
        return []
    if not text.startswith(SPACE):
        text = SPACE + text
    words, start = [], 0
    for i in range(1, len(text)):
        if text[i] == SPACE:
            words.append(text[start:i])
            start = i
    words.append(text[start:])
    return [w for w in words if w]


def _logsumexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


class UnigramTokenizer(Tokenizer):
    """Pieces with log-probability scores; ``pieces[unk_id]`` is the unknown token. With ``byte_fallback`` the
    vocabulary must contain the 256 pieces ``<0x00>``…``<0xFF>``."""

    kind = "unigram"

    def __init__(self, pieces: Sequence[tuple[str, float]], unk_id: int = 0, byte_fallback: bool = False,
                 special_tokens: Sequence[str] = ()) -> None:
        self.pieces = [(str(p), float(s)) for p, s in pieces]
        self.index = {p: i for i, (p, _) in enumerate(self.pieces)}
        if len(self.index) != len(self.pieces):
            raise ValueError("pieces must be distinct")
        if not 0 <= unk_id < len(self.pieces):
            raise ValueError(f"unk_id must index the {len(self.pieces)} pieces, got {unk_id!r}")
        missing = [b for b in BYTE_PIECES if b not in self.index] if byte_fallback else []
        if missing:
            raise ValueError(f"byte_fallback needs the 256 byte pieces; missing {missing[:3]} and {len(missing) - 3} more"
                             if len(missing) > 3 else f"byte_fallback needs the 256 byte pieces; missing {missing}")
        self.unk_id, self.byte_fallback = unk_id, byte_fallback
        self.special_tokens = {t: self.index[t] for t in dict.fromkeys([self.pieces[unk_id][0], *special_tokens])}
        # every piece but the unknown one can match text (as in tokenizers, special pieces too, if written out)
        self.scores = {p: s for i, (p, s) in enumerate(self.pieces) if i != unk_id}
        self.max_len = max((len(p) for p in self.scores), default=1)
        self.unk_score = min(s for _, s in self.pieces) - UNK_PENALTY

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def viterbi(self, word: str) -> list[str]:
        """The most probable segmentation of one word. A character no piece starts with costs ``unk_score``;
        runs of them become one unknown piece, or their UTF-8 bytes with byte fallback."""
        n = len(word)
        best = [-math.inf] * (n + 1)  # best[i]: best log-probability of word[:i]
        back: list[tuple[int, bool]] = [(0, False)] * (n + 1)  # (start of the last piece, is it unknown)
        best[0] = 0.0
        for start in range(n):
            if best[start] == -math.inf:
                continue
            matched_single = False
            for end in range(start + 1, min(n, start + self.max_len) + 1):
                score = self.scores.get(word[start:end])
                if score is None:
                    continue
                matched_single |= end == start + 1
                if best[start] + score > best[end]:
                    best[end], back[end] = best[start] + score, (start, False)
            if not matched_single and best[start] + self.unk_score > best[start + 1]:
                best[start + 1], back[start + 1] = best[start] + self.unk_score, (start, True)
        spans: list[tuple[str, bool]] = []
        i = n
        while i > 0:
            start, unknown = back[i]
            spans.append((word[start:i], unknown))
            i = start
        pieces: list[str] = []
        previous_unknown = False
        for piece, unknown in reversed(spans):
            if not unknown:
                pieces.append(piece)
            elif self.byte_fallback:
                pieces.extend(f"<0x{b:02X}>" for b in piece.encode("utf-8"))
            elif not previous_unknown:
                pieces.append(self.pieces[self.unk_id][0])  # consecutive unknowns fused into one
            previous_unknown = unknown
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [p for w in pretokenize(text) for p in self.viterbi(w)]

    def encode(self, text: str) -> list[int]:
        return [self.index[p] for p in self.tokenize(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Concatenate pieces (byte pieces as bytes), ``▁`` back to spaces, drop the one prepended space."""
        buf = bytearray()
        for i in self.check_ids(ids):
            piece = self.pieces[i][0]
            if self.byte_fallback and piece in BYTE_PIECES:
                buf.append(int(piece[3:5], 16))
            else:
                buf.extend(piece.encode("utf-8"))
        text = buf.decode("utf-8", errors="replace").replace(SPACE, " ")
        return text[1:] if text.startswith(" ") else text

    def log_likelihood(self, texts: Iterable[str]) -> float:
        """Sum over words of log P(best segmentation) — the quantity Viterbi maximises."""
        total = 0.0
        for w in (w for t in texts for w in pretokenize(t)):
            total += sum(self.scores.get(p, self.unk_score) for p in self.viterbi(w))
        return total

    # -------------------------------------------------------------------------------------------- training
    @staticmethod
    def _expected_counts(words: Counter, logp: dict[str, float], max_len: int) -> tuple[Counter, float]:
        """E-step: expected piece counts under the current model (forward-backward) and the log-likelihood."""
        counts: Counter[str] = Counter()
        total = 0.0
        for word, freq in words.items():
            n = len(word)
            alpha = [-math.inf] * (n + 1)
            alpha[0] = 0.0
            for end in range(1, n + 1):
                for start in range(max(0, end - max_len), end):
                    s = logp.get(word[start:end])
                    if s is not None and alpha[start] > -math.inf:
                        alpha[end] = _logsumexp(alpha[end], alpha[start] + s)
            beta = [-math.inf] * (n + 1)
            beta[n] = 0.0
            for start in range(n - 1, -1, -1):
                for end in range(start + 1, min(n, start + max_len) + 1):
                    s = logp.get(word[start:end])
                    if s is not None and beta[end] > -math.inf:
                        beta[start] = _logsumexp(beta[start], s + beta[end])
            z = alpha[n]
            total += freq * z
            for start in range(n):
                for end in range(start + 1, min(n, start + max_len) + 1):
                    piece = word[start:end]
                    s = logp.get(piece)
                    if s is not None:
                        counts[piece] += freq * math.exp(alpha[start] + s + beta[end] - z)
        return counts, total

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, unk_token: str = "<unk>", special_tokens: Sequence[str] = (),
              max_piece_length: int = 8, seed_size: int = 5000, shrinking_factor: float = 0.75,
              em_iterations: int = 2, byte_fallback: bool = False) -> UnigramTokenizer:
        """EM training: seed with every character and the ``seed_size`` most frequent substrings (frequency x
        length), then alternate ``em_iterations`` EM steps with pruning to ``shrinking_factor`` of the pieces
        (characters are never pruned) until ``vocab_size`` (including unknown, special and byte pieces)."""
        if not 0 < shrinking_factor < 1:
            raise ValueError(f"shrinking_factor must be in (0, 1), got {shrinking_factor!r}")
        if max_piece_length < 1:
            raise ValueError(f"max_piece_length must be >= 1, got {max_piece_length!r}")
        words = Counter(w for t in texts for w in pretokenize(t))
        if not words:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        specials = list(dict.fromkeys([unk_token, *special_tokens]))
        reserved = len(specials) + (256 if byte_fallback else 0)
        chars = Counter()
        subs = Counter()
        for w, f in words.items():
            for i in range(len(w)):
                chars[w[i]] += f
                for j in range(i + 2, min(len(w), i + max_piece_length) + 1):
                    subs[w[i:j]] += f
        if vocab_size < reserved + len(chars):
            raise ValueError(f"vocab_size must hold {reserved} reserved pieces and the {len(chars)} characters "
                             f"({reserved + len(chars)}), got {vocab_size!r}")
        seeds = sorted((s for s, f in subs.items() if f > 1), key=lambda s: (-subs[s] * len(s), s))[:seed_size]
        freq = {**chars, **{s: subs[s] for s in seeds}}
        total = sum(freq.values())
        logp = {p: math.log(f / total) for p, f in freq.items()}
        target = vocab_size - reserved
        while True:
            for _ in range(em_iterations):
                counts, _ = cls._expected_counts(words, logp, max_piece_length)
                counts.update({c: 0.0 for c in chars})
                z = sum(counts.values())
                logp = {p: math.log(max(counts[p], 1e-10) / z) for p in logp if counts[p] > 0 or p in chars}
            if len(logp) <= target:
                break
            # loss of removing a piece ~ its expected count x (log p(piece) - log p(best other split of it))
            probe = cls([("\0unk", 0.0), *logp.items()])
            loss = {}
            for p in logp:
                if len(p) == 1:
                    continue
                saved = probe.scores.pop(p)
                alternative = sum(probe.scores.get(q, probe.unk_score) for q in probe.viterbi(p))
                probe.scores[p] = saved
                loss[p] = counts[p] * (saved - alternative)
            keep_n = max(target, int(len(logp) * shrinking_factor))
            removable = sorted(loss, key=lambda p: (loss[p], p))
            drop = set(removable[:max(0, len(logp) - keep_n)])
            logp = {p: s for p, s in logp.items() if p not in drop}
        ranked = sorted(logp.items(), key=lambda ps: (-ps[1], ps[0]))
        pieces = [(t, 0.0) for t in specials] + (
            [(b, 0.0) for b in BYTE_PIECES] if byte_fallback else []) + ranked
        return cls(pieces, unk_id=0, byte_fallback=byte_fallback, special_tokens=specials[1:])

    # -------------------------------------------------------------- interop and persistence
    def to_hf(self):
        """The same pieces and scores as a ``tokenizers.Tokenizer`` (Unigram model, Metaspace pre-tokenizer)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers

        hf = HFTokenizer(models.Unigram(self.pieces, unk_id=self.unk_id, byte_fallback=self.byte_fallback))
        hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="always", split=True)
        return hf

    def to_dict(self) -> dict:
        return {"pieces": [list(p) for p in self.pieces], "unk_id": self.unk_id, "byte_fallback": self.byte_fallback,
                "special_tokens": [t for t in self.special_tokens if self.index[t] != self.unk_id]}

    @classmethod
    def from_dict(cls, state: dict) -> UnigramTokenizer:
        return cls([tuple(p) for p in state["pieces"]], state["unk_id"], state["byte_fallback"],
                   state["special_tokens"])
