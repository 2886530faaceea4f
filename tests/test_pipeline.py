"""Packing with datasets.map (deterministic fingerprints, cache), seeded DataLoader, the three collators."""

import datasets
import pytest
import torch

from companion.pipeline import (
    IGNORE_INDEX,
    CausalLMCollator,
    MaskedLMCollator,
    PackConfig,
    PairCollator,
    make_dataloader,
    tokenize_and_pack,
)
from companion.tokenization import CharTokenizer

TEXTS = ["床前明月光", "疑是地上霜", "举头望明月", "低头思故乡", "春眠不觉晓"]


def _dataset():
    ds = datasets.Dataset.from_dict({"text": TEXTS})
    return datasets.Dataset(ds.data, fingerprint="fixed-input")


def _tok():
    return CharTokenizer.train(TEXTS, special_tokens=["<pad>", "<eos>", "<mask>", "<cls>", "<sep>"])


def test_pack_blocks_are_the_token_stream():
    tok = _tok()
    eos = tok.token_id("<eos>")
    packed = tokenize_and_pack(_dataset(), tok, PackConfig(block_size=4, separator_id=eos))
    stream = [i for t in TEXTS for i in tok.encode(t) + [eos]]  # 30 tokens -> 7 blocks of 4, 2 dropped
    assert packed["input_ids"] == [stream[i:i + 4] for i in range(0, 28, 4)]


def test_fingerprint_deterministic_and_cached(tmp_path):
    tok, config = _tok(), PackConfig(block_size=3)
    a = tokenize_and_pack(_dataset(), tok, config, cache_dir=tmp_path)
    b = tokenize_and_pack(_dataset(), tok, config, cache_dir=tmp_path)
    assert a._fingerprint == b._fingerprint
    assert [p.name for p in tmp_path.iterdir()] == [f"packed-{a._fingerprint}.arrow"]
    c = tokenize_and_pack(_dataset(), tok, PackConfig(block_size=4))
    assert c._fingerprint != a._fingerprint


def test_causal_collator_pads_and_ignores():
    out = CausalLMCollator(pad_id=0)([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[5, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_mlm_collator_80_10_10():
    g = torch.Generator().manual_seed(0)
    collator = MaskedLMCollator(mask_id=2, vocab_size=1000, pad_id=0, special_ids=(0, 1, 2, 3), generator=g)
    rows = [{"input_ids": list(range(10, 1010))} for _ in range(20)]
    out = collator(rows)
    original = torch.arange(10, 1010).repeat(20, 1)
    chosen = out["labels"] != IGNORE_INDEX
    assert torch.equal(out["labels"][chosen], original[chosen])
    assert abs(chosen.float().mean().item() - 0.15) < 0.01  # 20000 tokens: std of the rate is 0.0025
    masked = (out["input_ids"] == 2) & chosen
    kept = (out["input_ids"] == original) & chosen
    assert abs(masked.sum().item() / chosen.sum().item() - 0.8) < 0.03
    assert abs(kept.sum().item() / chosen.sum().item() - 0.1) < 0.03
    assert torch.equal(out["input_ids"][~chosen], original[~chosen])
    assert not torch.isin(out["input_ids"], torch.tensor([0, 1, 3])).any()


def test_mlm_never_masks_specials_or_padding():
    g = torch.Generator().manual_seed(1)
    collator = MaskedLMCollator(mask_id=2, vocab_size=50, special_ids=(1, 2), probability=0.99, generator=g)
    out = collator([{"input_ids": [1, 5, 6, 1]}, {"input_ids": [1, 7]}])
    assert (out["labels"][:, 0] == IGNORE_INDEX).all() and out["labels"][1, 2:].eq(IGNORE_INDEX).all()


def test_pair_collator():
    out = PairCollator(cls_id=1, sep_id=2, max_length=7)([{"first": [5, 6, 7, 8], "second": [9], "label": 1},
                                                          {"first": [5], "second": [9, 9], "label": 0}])
    assert out["input_ids"].tolist() == [[1, 5, 6, 7, 2, 9, 2], [1, 5, 2, 9, 9, 2, 0]]
    assert out["token_type_ids"].tolist() == [[0, 0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1, 0]]
    assert out["labels"].tolist() == [1, 0]


def test_dataloader_seeded():
    packed = tokenize_and_pack(_dataset(), _tok(), PackConfig(block_size=2))
    first = [b["input_ids"].tolist() for b in make_dataloader(packed, 3, CausalLMCollator(), seed=7)]
    again = [b["input_ids"].tolist() for b in make_dataloader(packed, 3, CausalLMCollator(), seed=7)]
    other = [b["input_ids"].tolist() for b in make_dataloader(packed, 3, CausalLMCollator(), seed=8)]
    assert first == again and first != other
    assert sorted(r for b in first for r in b) == sorted(packed["input_ids"])


def test_errors():
    with pytest.raises(ValueError, match="block_size must be a positive int, got 0"):
        PackConfig(block_size=0)
    with pytest.raises(ValueError, match="column 'content' not in the dataset"):
        tokenize_and_pack(_dataset(), _tok(), PackConfig(text_column="content"))
    with pytest.raises(ValueError, match="probability must be in"):
        MaskedLMCollator(mask_id=1, vocab_size=10, probability=1.5)
