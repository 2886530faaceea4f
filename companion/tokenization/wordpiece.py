"""WordPiece (Schuster & Nakajima, 2012; the tokenizer of BERT, Devlin et al., 2019; Wu et al., 2016).

Encoding is greedy longest-match-first inside each pre-tokenized word: take the longest vocabulary entry that
starts the rest of the word (non-initial pieces carry the ``##`` prefix); if no entry matches, the whole word
becomes ``[UNK]`` — Hugging Face ``tokenizers``' ``WordPiece`` model behaves exactly so (tested).
Training merges the pair with the highest likelihood gain ``count(ab) / (count(a) count(b))`` (the score of the
Hugging Face course's description of WordPiece). ``tokenizers``' ``WordPieceTrainer`` instead ranks pairs by
count, as BPE does, so the two vocabularies differ while the encoders agree given the same vocabulary.
Pre-tokenization follows BERT: split on whitespace, every punctuation character is a word of its own. Punctuation
is Unicode's ``P*`` as the ``regex`` module knows it; ``tokenizers``' older tables disagree on ~150 code points
(punctuation added since Unicode 9, e.g. U+2E43 onwards), where the two pre-tokenizers split differently.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import regex

from companion.tokenization.base import Tokenizer, check_text

_PUNCT = r"\p{P}\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7e"  # BERT's punctuation: Unicode P* and all ASCII symbols
# BERT's _is_chinese_char blocks: CJK Unified Ideographs (+ extensions A-E) and compatibility ideographs
_CJK = (r"\u4e00-\u9fff\u3400-\u4dbf\U00020000-\U0002a6df\U0002a700-\U0002b73f\U0002b740-\U0002b81f"
        r"\U0002b820-\U0002ceaf\uf900-\ufaff\U0002f800-\U0002fa1f")
BERT_PATTERN = rf"[^\s{_PUNCT}]+|[{_PUNCT}]"
BERT_CJK_PATTERN = rf"[{_CJK}]|[^\s{_PUNCT}{_CJK}]+|[{_PUNCT}]"
PREFIX = "##"  # marks a piece that continues a word


def pretokenize(text: str, split_cjk: bool = False) -> list[str]:
    """BERT's split: runs of non-space, non-punctuation characters, and single punctuation characters; with
    ``split_cjk`` every CJK ideograph is a word of its own (BERT's ``tokenize_chinese_chars``, as in the
    Chinese BERT models, so Chinese is tokenized character by character)."""
    return regex.findall(BERT_CJK_PATTERN if split_cjk else BERT_PATTERN, check_text(text))


class WordPieceTokenizer(Tokenizer):
    """WordPiece with vocabulary ``vocab`` (id = position); ``unk_token`` must be in it."""

    kind = "wordpiece"

    def __init__(self, vocab: Sequence[str], unk_token: str = "[UNK]", special_tokens: Sequence[str] = (),
                 max_input_chars_per_word: int = 100, split_cjk: bool = False) -> None:
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab entries must be distinct")
        if unk_token not in vocab:
            raise ValueError(f"unk_token {unk_token!r} is not in the vocabulary")
        missing = [t for t in special_tokens if t not in vocab]
        if missing:
            raise ValueError(f"special tokens {missing!r} are not in the vocabulary")
        if max_input_chars_per_word < 1:
            raise ValueError(f"max_input_chars_per_word must be >= 1, got {max_input_chars_per_word!r}")
        self.vocab = list(vocab)
        self.index = {t: i for i, t in enumerate(self.vocab)}
        self.unk_token, self.max_input_chars_per_word = unk_token, max_input_chars_per_word
        self.split_cjk = split_cjk  # every CJK ideograph a word of its own (Chinese BERT)
        self.special_tokens = {t: self.index[t] for t in dict.fromkeys([unk_token, *special_tokens])}
        self.max_len = max(len(t) for t in self.vocab)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def tokenize_word(self, word: str) -> list[str]:
        """Greedy longest-match-first pieces of one word, or ``[unk_token]``."""
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_token]
        pieces, start = [], 0
        while start < len(word):
            prefix = PREFIX if start else ""
            for end in range(min(len(word), start + self.max_len), start, -1):
                piece = prefix + word[start:end]
                if piece in self.index:
                    pieces.append(piece)
                    start = end
                    break
            else:
                return [self.unk_token]
        return pieces

    def tokenize(self, text: str) -> list[str]:
        return [p for w in pretokenize(text, self.split_cjk) for p in self.tokenize_word(w)]

    def encode(self, text: str) -> list[int]:
        return [self.index[p] for p in self.tokenize(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """Pieces joined, ``##`` pieces glued to the previous one, words separated by one space (BERT's decode:
        the original spacing is not kept)."""
        out: list[str] = []
        for i in self.check_ids(ids):
            piece = self.vocab[i]
            if piece.startswith(PREFIX) and out:
                out[-1] += piece[len(PREFIX):]
            else:
                out.append(piece)
        return " ".join(out)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ("[UNK]",),
              unk_token: str = "[UNK]", min_frequency: int = 1, split_cjk: bool = False) -> WordPieceTokenizer:
        """Learn a vocabulary of at most ``vocab_size`` entries (special tokens first, then the alphabet, then
        merged pieces) by repeatedly merging the pair with the highest ``count(ab) / (count(a) count(b))``;
        ties go to the lexicographically smallest pair, so the result is deterministic."""
        specials = list(dict.fromkeys([unk_token, *special_tokens]))
        words = Counter(w for t in texts for w in pretokenize(t, split_cjk))
        if not words:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        splits = [[w[0]] + [PREFIX + c for c in w[1:]] for w in words]
        freqs = list(words.values())
        alphabet = sorted({p for s in splits for p in s})
        if vocab_size < len(specials) + len(alphabet):
            raise ValueError(f"vocab_size must hold the {len(specials)} special tokens and the {len(alphabet)}-symbol "
                             f"alphabet ({len(specials) + len(alphabet)}), got {vocab_size!r}")
        vocab = specials + alphabet
        known = set(vocab)
        pieces: Counter[str] = Counter()
        pairs: Counter[tuple[str, str]] = Counter()
        where: dict[tuple[str, str], set[int]] = defaultdict(set)

        def account(k: int, sign: int) -> None:
            s, f = splits[k], freqs[k] * sign
            for p in s:
                pieces[p] += f
            for pair in zip(s, s[1:]):
                pairs[pair] += f
                if sign > 0:
                    where[pair].add(k)

        for k in range(len(splits)):
            account(k, +1)
        while len(vocab) < vocab_size:
            live = [(p, n) for p, n in pairs.items() if n >= min_frequency and n > 0]
            if not live:
                break
            best = min(live, key=lambda pn: (-pn[1] / (pieces[pn[0][0]] * pieces[pn[0][1]]), pn[0]))[0]
            a, b = best
            merged = a + b[len(PREFIX):] if b.startswith(PREFIX) else a + b
            for k in sorted(where.pop(best, ())):
                s = splits[k]
                if not any(s[i] == a and s[i + 1] == b for i in range(len(s) - 1)):
                    continue
                account(k, -1)
                out, i = [], 0
                while i < len(s):
                    if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                        out.append(merged)
                        i += 2
                    else:
                        out.append(s[i])
                        i += 1
                splits[k] = out
                account(k, +1)
            pairs.pop(best, None)
            if merged not in known:
                known.add(merged)
                vocab.append(merged)
        return cls(vocab, unk_token, specials, split_cjk=split_cjk)

    # -------------------------------------------------------------- interop and persistence
    def to_hf(self):
        """The same vocabulary as a ``tokenizers.Tokenizer`` (WordPiece model, BERT pre-tokenizer)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, normalizers, pre_tokenizers

        hf = HFTokenizer(models.WordPiece(self.index, unk_token=self.unk_token,
                                          max_input_chars_per_word=self.max_input_chars_per_word))
        if self.split_cjk:  # only the CJK spacing of BertNormalizer: no cleaning, accents or lowercasing
            hf.normalizer = normalizers.BertNormalizer(clean_text=False, handle_chinese_chars=True,
                                                       strip_accents=False, lowercase=False)
        hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        return hf

    def to_dict(self) -> dict:
        return {"vocab": self.vocab, "unk_token": self.unk_token, "special_tokens": list(self.special_tokens),
                "max_input_chars_per_word": self.max_input_chars_per_word, "split_cjk": self.split_cjk}

    @classmethod
    def from_dict(cls, state: dict) -> WordPieceTokenizer:
        return cls(state["vocab"], state["unk_token"], state["special_tokens"], state["max_input_chars_per_word"],
                   state.get("split_cjk", False))
