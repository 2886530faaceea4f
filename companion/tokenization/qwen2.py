"""The Qwen tokenizer (Bai et al., 2023), a large-vocabulary byte-level BPE that Qwen2, Qwen2.5 and Qwen3 reuse.

The file is llama.cpp's vocabulary-only GGUF (``models/ggml-vocab-qwen2.gguf``: 151,643 BPE tokens, 3 control
tokens, 290 padding slots, 151,387 merges, no weights), shipped in PyPI ``llama-cpp-python``'s source archive and
stored under ``data/tokenizers/qwen2``. Beside it llama.cpp ships test strings and the ids that Qwen's own
Hugging Face tokenizer gives them (:func:`qwen2_reference_cases`), the check that a loader reproduces it.
"""

from __future__ import annotations

from functools import lru_cache

from companion.data import QWEN2_CASE_IDS, QWEN2_CASES, QWEN2_VOCAB, data_path

CASE_SEPARATOR = "\n__ggml_vocab_test__\n"


@lru_cache(maxsize=1)
def load_qwen2_tokenizer():
    """Qwen's tokenizer as a transformers ``Qwen2Tokenizer`` (built from the GGUF file; no download)."""
    from companion.models.gguf import load_gguf_tokenizer

    return load_gguf_tokenizer(data_path(QWEN2_VOCAB))


def qwen2_reference_cases() -> list[tuple[str, list[int]]]:
    """``[(text, ids)]``: llama.cpp's tokenizer test strings and the ids Qwen's Hugging Face tokenizer gives them
    (``encode(text, add_special_tokens=False)``, recorded by llama.cpp's ``convert_hf_to_gguf_update.py``)."""
    texts = data_path(QWEN2_CASES).read_text(encoding="utf-8").removesuffix(CASE_SEPARATOR).split(CASE_SEPARATOR)
    lines = data_path(QWEN2_CASE_IDS).read_text(encoding="utf-8").removesuffix("\n").split("\n")
    if len(texts) != len(lines):
        raise ValueError(f"{QWEN2_CASES} holds {len(texts)} test strings but {QWEN2_CASE_IDS} {len(lines)} id lines")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, lines)]
