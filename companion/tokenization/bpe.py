"""Byte-level byte-pair encoding (Sennrich et al., 2016; byte-level as in GPT-2, Radford et al., 2019).

Text is split by a pre-tokenization regex (GPT-2's by default), each piece is turned into UTF-8 bytes, and the
learned merges are applied lowest rank first. The 256 byte tokens take ids 0-255 in GPT-2's order (the order
of :func:`bytes_to_unicode`, which is also Hugging Face ``tokenizers``' ByteLevel order), merged tokens follow
in merge order, special tokens come last. Training picks the most frequent pair and breaks ties by the
smaller pair of ids, exactly like ``tokenizers``' ``BpeTrainer``; :meth:`BPETokenizer.to_hf` exports to
``tokenizers`` (the fast path) and :meth:`BPETokenizer.to_tiktoken` to ``tiktoken``.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from functools import lru_cache

import regex

from companion.tokenization.base import Tokenizer, check_text

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CACHE_SIZE = 1 << 16


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable Unicode characters."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs)))


BYTE_ORDER: tuple[int, ...] = tuple(bytes_to_unicode())  # byte value of base token id i


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids``, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _check_vocab_size(vocab_size: int, special: Sequence[str]) -> None:
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(special):
        raise ValueError(f"vocab_size must be at least 256 (the byte alphabet) + {len(special)} special "
                         f"tokens = {256 + len(special)}, got {vocab_size!r}")


class BPETokenizer(Tokenizer):
    """Byte-level BPE defined by its ordered ``merges`` (pairs of token ids), its pre-tokenization
    ``pattern`` and its ``special_tokens`` (recognised verbatim in the input)."""

    kind = "bpe"

    def __init__(self, merges: Sequence[tuple[int, int]], special_tokens: Sequence[str] = (),
                 pattern: str = GPT2_PATTERN) -> None:
        self.vocab: list[bytes] = [bytes([b]) for b in BYTE_ORDER]  # id -> bytes
        self.byte_ids = [0] * 256
        for i, b in enumerate(BYTE_ORDER):
            self.byte_ids[b] = i
        index = {v: i for i, v in enumerate(self.vocab)}
        self.merges: list[tuple[int, int]] = []
        self.ranks: dict[tuple[int, int], tuple[int, int]] = {}  # pair -> (rank, merged id)
        for rank, (a, b) in enumerate(merges):
            if not (0 <= a < len(self.vocab) and 0 <= b < len(self.vocab)):
                raise ValueError(f"merge {rank} = ({a}, {b}) refers to ids outside [0, {len(self.vocab)})")
            merged = self.vocab[a] + self.vocab[b]
            if merged not in index:  # two pairs can spell the same bytes; they share one id (as in tokenizers)
                index[merged] = len(self.vocab)
                self.vocab.append(merged)
            self.merges.append((int(a), int(b)))
            self.ranks[(int(a), int(b))] = (rank, index[merged])
        special = list(special_tokens)
        if len(set(special)) != len(special) or any(not isinstance(t, str) or not t for t in special):
            raise ValueError(f"special tokens must be distinct non-empty strings, got {special!r}")
        self.special_tokens = {t: len(self.vocab) + i for i, t in enumerate(special)}
        self.special_by_id = {i: t for t, i in self.special_tokens.items()}
        self.pattern = pattern
        self._regex = regex.compile(pattern)
        self._special_regex = (regex.compile("(" + "|".join(regex.escape(t) for t in
                                                         sorted(special, key=len, reverse=True)) + ")")
                               if special else None)
        self._encode_chunk = lru_cache(maxsize=_CACHE_SIZE)(self._encode_chunk_uncached)
        self._hf = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    # ------------------------------------------------------------------ encode / decode
    def pretokenize(self, text: str) -> list[str]:
        """The pieces that merges never cross."""
        return self._regex.findall(check_text(text))

    def _encode_chunk_uncached(self, chunk: str) -> tuple[int, ...]:
        ids = [self.byte_ids[b] for b in chunk.encode("utf-8")]
        while len(ids) >= 2:
            pair = min(zip(ids, ids[1:]), key=lambda p: self.ranks.get(p, (len(self.ranks), 0))[0])
            if pair not in self.ranks:
                break
            ids = merge_pair(ids, pair, self.ranks[pair][1])
        return tuple(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it become their ids."""
        check_text(text)
        parts = self._special_regex.split(text) if self._special_regex else [text]
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:  # the split keeps the matched special tokens at odd positions
                ids.append(self.special_tokens[part])
            else:
                for chunk in self._regex.findall(part):
                    ids.extend(self._encode_chunk(chunk))
        return ids

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.vocab[i] if i < len(self.vocab) else self.special_by_id[i].encode("utf-8")
                        for i in self.check_ids(ids))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 (a cut inside a character) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, i: int) -> bytes:
        return self.decode_bytes([i])

    # ------------------------------------------------------------------ training
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (),
              pattern: str = GPT2_PATTERN, min_frequency: int = 0) -> BPETokenizer:
        """Learn merges until the vocabulary (256 bytes + merges + special tokens) has ``vocab_size`` entries,
        or no pair occurs ``min_frequency`` times (or at all)."""
        special = list(special_tokens)
        _check_vocab_size(vocab_size, special)
        splitter = regex.compile(pattern)
        words: Counter[str] = Counter()
        for text in texts:
            words.update(splitter.findall(check_text(text)))
        if not words:
            raise ValueError("cannot train a tokenizer on an empty corpus")
        base = cls([], special, pattern)
        seqs = [[base.byte_ids[b] for b in w.encode("utf-8")] for w in words]
        freqs = list(words.values())
        pair_counts: defaultdict[tuple[int, int], int] = defaultdict(int)
        where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)
        for w, (seq, f) in enumerate(zip(seqs, freqs)):
            for pair in zip(seq, seq[1:]):
                pair_counts[pair] += f
                where[pair].add(w)
        heap = [(-c, p) for p, c in pair_counts.items()]  # max count first, then the smaller pair
        heapq.heapify(heap)
        vocab = list(base.vocab)
        index = {v: i for i, v in enumerate(vocab)}
        merges: list[tuple[int, int]] = []
        n_tokens = 256
        while n_tokens < vocab_size - len(special) and heap:
            neg, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if count != -neg:  # stale entry; the current count was pushed when it changed
                continue
            if count == 0 or count < min_frequency:
                break
            merged = vocab[pair[0]] + vocab[pair[1]]
            if merged not in index:
                index[merged] = len(vocab)
                vocab.append(merged)
                n_tokens += 1
            new_id = index[merged]
            merges.append(pair)
            touched: set[tuple[int, int]] = set()
            for w in sorted(where.pop(pair)):
                seq, f = seqs[w], freqs[w]
                for p in zip(seq, seq[1:]):
                    pair_counts[p] -= f
                    touched.add(p)
                seq = seqs[w] = merge_pair(seq, pair, new_id)
                for p in zip(seq, seq[1:]):
                    pair_counts[p] += f
                    where[p].add(w)
                    touched.add(p)
            pair_counts.pop(pair, None)
            for p in touched - {pair}:
                if pair_counts[p] > 0:
                    heapq.heappush(heap, (-pair_counts[p], p))
                else:
                    pair_counts.pop(p, None)
                    where.pop(p, None)
        return cls(merges, special, pattern)

    @classmethod
    def train_fast(cls, texts: Iterable[str], vocab_size: int, special_tokens: Sequence[str] = (),
                   pattern: str = GPT2_PATTERN, min_frequency: int = 0) -> BPETokenizer:
        """Same result as :meth:`train`, computed by ``tokenizers``' Rust ``BpeTrainer`` (for large corpora)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import models, pre_tokenizers, trainers

        special = list(special_tokens)
        _check_vocab_size(vocab_size, special)
        texts = [check_text(t) for t in texts]
        if not any(texts):
            raise ValueError("cannot train a tokenizer on an empty corpus")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = _hf_pre_tokenizer(pattern)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(special), min_frequency=min_frequency,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(texts, trainer=trainer)
        return cls.from_hf(hf, special, pattern)

    # ------------------------------------------------------------------ interop
    def _unicode_token(self, i: int) -> str:
        table = bytes_to_unicode()
        return "".join(table[b] for b in self.vocab[i])

    def to_hf(self):
        """This tokenizer as a ``tokenizers.Tokenizer`` (same ids; Rust speed)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models

        vocab = {self._unicode_token(i): i for i in range(len(self.vocab))}
        merges = [(self._unicode_token(a), self._unicode_token(b)) for a, b in self.merges]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges))
        hf.pre_tokenizer = _hf_pre_tokenizer(self.pattern)
        hf.decoder = decoders.ByteLevel()
        if self.special_tokens:
            hf.add_special_tokens(list(self.special_tokens))
        return hf

    @classmethod
    def from_hf(cls, hf, special_tokens: Sequence[str] = (), pattern: str = GPT2_PATTERN) -> BPETokenizer:
        """Read the merges of a byte-level ``tokenizers`` BPE model (ids may be renumbered)."""
        import json

        model = json.loads(hf.to_str())["model"]
        decode = {c: b for b, c in bytes_to_unicode().items()}
        to_bytes = {tok: bytes(decode[c] for c in tok) for tok in model["vocab"]}
        base = cls([], (), pattern)
        index = {v: i for i, v in enumerate(base.vocab)}
        merges = []
        for m in model["merges"]:
            a, b = m.split(" ") if isinstance(m, str) else m
            merges.append((index[to_bytes[a]], index[to_bytes[b]]))
            index.setdefault(to_bytes[a] + to_bytes[b], len(index))
        return cls(merges, special_tokens, pattern)

    def to_tiktoken(self, name: str = "companion-bpe"):
        """This tokenizer as a ``tiktoken.Encoding`` (needs one id per distinct byte string)."""
        import tiktoken

        if len(set(self.vocab)) != len(self.vocab) or len(self.vocab) != 256 + len(self.merges):
            raise ValueError("tiktoken needs merge ranks equal to token ids; two merges here spell the same bytes")
        return tiktoken.Encoding(name=name, pat_str=self.pattern,
                                 mergeable_ranks={v: i for i, v in enumerate(self.vocab)},
                                 special_tokens=dict(self.special_tokens))

    def encode_many(self, texts: Sequence[str], fast: bool = True) -> list[list[int]]:
        """Encode many texts; ``fast=True`` goes through ``tokenizers`` (same ids, parallel Rust)."""
        texts = [check_text(t) for t in texts]
        if not fast:
            return [self.encode(t) for t in texts]
        if self._hf is None:
            self._hf = self.to_hf()
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets we do not return
        encode = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        return [e.ids for e in encode(texts, add_special_tokens=False)]

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict:
        return {"merges": [list(m) for m in self.merges], "pattern": self.pattern,
                "special_tokens": list(self.special_tokens)}

    @classmethod
    def from_dict(cls, state: dict) -> BPETokenizer:
        return cls([tuple(m) for m in state["merges"]], state["special_tokens"], state["pattern"])


def _hf_pre_tokenizer(pattern: str):
    from tokenizers import Regex, pre_tokenizers

    if pattern == GPT2_PATTERN:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
