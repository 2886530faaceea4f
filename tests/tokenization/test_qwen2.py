"""Qwen's tokenizer from llama.cpp's vocabulary-only GGUF, against the ids Qwen's own Hugging Face tokenizer gave
llama.cpp's test strings."""

import pytest

from companion.data import QWEN2_VOCAB, load_manifest
from companion.tokenization import load_qwen2_tokenizer, qwen2_reference_cases

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def tok():
    return load_qwen2_tokenizer()


def test_reference_cases_parse():
    cases = qwen2_reference_cases()
    assert len(cases) == 46
    texts = [t for t, _ in cases]
    assert texts[0] == "ied 4 ½ months" and "" in texts  # the empty string is a case (no ids)
    assert all(isinstance(i, int) for _, ids in cases for i in ids)
    assert dict(cases)[""] == []


def test_reproduces_qwen_hf_tokenizer_on_llama_cpp_cases(tok):
    for text, ids in qwen2_reference_cases():
        assert tok.encode(text, add_special_tokens=False) == ids, text
        assert tok.decode(ids) == text


def test_vocabulary_and_chinese(tok):
    # 151,643 BPE tokens + 3 control tokens; the GGUF pads the id space to 151,936
    assert len(tok) == 151_936
    assert tok.convert_ids_to_tokens([151_643, 151_644, 151_645]) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    poem = "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
    ids = tok.encode(poem, add_special_tokens=False)
    assert tok.decode(ids) == poem
    assert len(ids) < len(poem)  # common two-character words are single tokens
    # digits are split one per token (Qwen's pre-tokenizer), unlike GPT-2's runs of digits
    assert [tok.decode([i]) for i in tok.encode("2026", add_special_tokens=False)] == ["2", "0", "2", "6"]


def test_manifest_records_the_file():
    entry = load_manifest()[QWEN2_VOCAB]
    assert entry.size > 5_000_000 and "llama-cpp-python" in entry.source
