"""Character-level tokenizer: one id per Unicode code point seen in training (the tokenizer of char-RNN and
nanoGPT's Shakespeare demo). Unknown characters map to ``<unk>`` when it exists, else raise."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from companion.tokenization.base import Tokenizer, check_text


class CharTokenizer(Tokenizer):
    """Ids: special tokens first (in the given order), then characters by descending frequency, ties by
    code point — so the same corpus always gives the same vocabulary."""

    kind = "char"

    def __init__(self, chars: Sequence[str], special_tokens: Sequence[str] = ()) -> None:
        special = list(special_tokens)
        if len(set(special)) != len(special):
            raise ValueError(f"special tokens must be distinct, got {special!r}")
        bad = [c for c in chars if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise ValueError(f"chars must be single characters, got {bad[:5]!r}")
        if len(set(chars)) != len(chars):
            raise ValueError("chars must be distinct")
        self.special_tokens = {t: i for i, t in enumerate(special)}
        self.itos = special + list(chars)
        self.stoi = {c: i + len(special) for i, c in enumerate(chars)}
        self.unk_id = self.special_tokens.get("<unk>")

    @classmethod
    def train(cls, texts: Iterable[str], special_tokens: Sequence[str] = (), min_frequency: int = 1,
              max_size: int | None = None) -> CharTokenizer:
        """Vocabulary of the characters of ``texts`` seen at least ``min_frequency`` times (at most
        ``max_size`` characters, the most frequent)."""
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(check_text(text))
        if not counts:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        ranked = sorted((c for c, n in counts.items() if n >= min_frequency), key=lambda c: (-counts[c], c))
        return cls(ranked[:max_size], special_tokens)

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        ids = []
        for c in check_text(text):
            i = self.stoi.get(c, self.unk_id)
            if i is None:
                raise ValueError(f"character {c!r} (U+{ord(c):04X}) is not in the vocabulary and there is no <unk>")
            ids.append(i)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.itos[i] for i in self.check_ids(ids))

    def to_dict(self) -> dict:
        n = len(self.special_tokens)
        return {"special_tokens": self.itos[:n], "chars": self.itos[n:]}

    @classmethod
    def from_dict(cls, state: dict) -> CharTokenizer:
        return cls(state["chars"], state["special_tokens"])
