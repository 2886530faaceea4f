"""Tokenizers written from scratch: characters (:mod:`.char`), byte-level BPE (:mod:`.bpe`), WordPiece (:mod:`.wordpiece`), Unigram (:mod:`.unigram`), GPT-2's files
(:mod:`.gpt2`) and Qwen's large vocabulary (:mod:`.qwen2`, loaded with transformers). All share :class:`~companion.tokenization.base.Tokenizer` (batch encoding, padding, JSON)."""

from companion.tokenization.base import BatchEncoding, Tokenizer, load_tokenizer
from companion.tokenization.bpe import GPT2_PATTERN, BPETokenizer, bytes_to_unicode
from companion.tokenization.char import CharTokenizer
from companion.tokenization.gpt2 import gpt2_tiktoken_encoding, load_gpt2_tokenizer
from companion.tokenization.qwen2 import load_qwen2_tokenizer, qwen2_reference_cases
from companion.tokenization.unigram import UnigramTokenizer
from companion.tokenization.wordpiece import WordPieceTokenizer

__all__ = [
    "BatchEncoding",
    "Tokenizer",
    "load_tokenizer",
    "GPT2_PATTERN",
    "BPETokenizer",
    "bytes_to_unicode",
    "CharTokenizer",
    "gpt2_tiktoken_encoding",
    "load_gpt2_tokenizer",
    "load_qwen2_tokenizer",
    "qwen2_reference_cases",
    "UnigramTokenizer",
    "WordPieceTokenizer",
]
