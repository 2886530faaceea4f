"""What every tokenizer here shares: input checks, batch encoding with padding/truncation and attention
masks (the Hugging Face ``tokenizer(texts, padding=..., truncation=...)`` contract), JSON save/load and pickling.

Design: a tokenizer's whole state is its JSON dict (``to_dict``); pickling goes through it too, so caches and
compiled fast paths are rebuilt in the receiving process, never copied. Subclasses register under their ``kind``
when defined, so :func:`load_tokenizer` needs no import of the subclasses' modules.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class BatchEncoding:
    """Padded token ids of a batch; ``attention_mask`` is 1 on real tokens, 0 on padding."""

    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64
    lengths: tuple[int, ...]  # real length of each row (after truncation)


def pad_rows(rows: Sequence[Sequence[int]], pad_id: int, width: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``rows`` of ids with ``pad_id`` to ``width`` (default: the longest row; longer rows are cut).

    Returns ``(ids, attention_mask)``, both (B, T) int64; the mask is 1 on real tokens, 0 on padding.
    """
    width = max((len(r) for r in rows), default=0) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        n = min(len(row), width)
        ids[b, :n] = torch.as_tensor(row[:n], dtype=torch.long)
        mask[b, :n] = 1
    return ids, mask


def check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}: {text!r:.80}")
    return text


_KINDS: dict[str, type[Tokenizer]] = {}  # kind -> tokenizer class, filled by Tokenizer.__init_subclass__


class Tokenizer:
    """Base class. Subclasses set ``kind`` and define ``vocab_size``, ``special_tokens``, ``encode``, ``decode``,
    ``to_dict`` and ``from_dict`` (the whole state: it is what ``save`` writes and what pickling carries)."""

    kind = "base"
    special_tokens: dict[str, int]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:  # a class that names its own kind is what load_tokenizer builds for it
            _KINDS[cls.kind] = cls

    def __reduce__(self):
        """Pickle as ``type(self).from_dict(self.to_dict())``: what ``Dataset.map(num_proc>1)`` and spawn-started
        ``DataLoader`` workers need, without shipping caches or compiled fast paths."""
        return type(self).from_dict, (self.to_dict(),)

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        raise NotImplementedError

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids outside the vocabulary [0, {self.vocab_size}): {bad[:10]}")
        return ids

    def token_id(self, token: str) -> int:
        """Id of a special token, e.g. ``"<pad>"``."""
        if token not in self.special_tokens:
            raise KeyError(f"no special token {token!r}; this tokenizer has {sorted(self.special_tokens)}")
        return self.special_tokens[token]

    def encode_batch(
        self,
        texts: Sequence[str],
        max_length: int | None = None,
        padding: str = "longest",
        pad_id: int | None = None,
        truncation_side: str = "right",
    ) -> BatchEncoding:
        """Encode ``texts`` into a (B, T) tensor.

        ``padding="longest"`` pads to the longest row, ``"max_length"`` to ``max_length``; rows longer than
        ``max_length`` are truncated (on ``truncation_side``). ``pad_id`` defaults to the ``<pad>`` special
        token, else 0 (masked out either way).
        """
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise TypeError(f"texts must be a sequence of str, got {type(texts).__name__}")
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        if padding == "max_length" and max_length is None:
            raise ValueError("padding='max_length' needs max_length")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        rows = [self.encode(t) for t in texts]
        if max_length is not None:
            rows = [r[:max_length] if truncation_side == "right" else r[-max_length:] for r in rows]
        if pad_id is None:
            pad_id = self.special_tokens.get("<pad>", 0)
        ids, mask = pad_rows(rows, pad_id, max_length if padding == "max_length" else None)  # (B, T) each
        return BatchEncoding(ids, mask, tuple(len(r) for r in rows))

    def decode_batch(self, ids: torch.Tensor | Sequence[Sequence[int]], attention_mask: torch.Tensor | None = None
                     ) -> list[str]:
        """Decode each row, dropping positions where ``attention_mask`` is 0."""
        rows = ids.tolist() if isinstance(ids, torch.Tensor) else [list(r) for r in ids]
        if attention_mask is not None:
            masks = attention_mask.tolist()
            rows = [[i for i, m in zip(r, mk) if m] for r, mk in zip(rows, masks)]
        return [self.decode(r) for r in rows]

    # -------------------------------------------------------------- persistence
    def to_dict(self) -> dict:
        raise NotImplementedError

    @classmethod
    def from_dict(cls, state: dict) -> Tokenizer:
        raise NotImplementedError

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as JSON (UTF-8, stable key order)."""
        state = {"kind": self.kind, **self.to_dict()}
        Path(path).write_text(json.dumps(state, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        tokenizer = load_tokenizer(path)
        if not isinstance(tokenizer, cls):
            raise TypeError(f"{path} holds a {type(tokenizer).__name__}, not a {cls.__name__}")
        return tokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load any tokenizer saved with :meth:`Tokenizer.save` (its ``kind`` names the class)."""
    state = json.loads(Path(path).read_text(encoding="utf-8"))
    kind = state.pop("kind", None)
    if kind not in _KINDS:
        raise ValueError(f"{path}: unknown tokenizer kind {kind!r}; expected one of {sorted(_KINDS)}")
    return _KINDS[kind].from_dict(state)
