"""Causal LM loss vs transformers' GPT-2 loss and a hand loop; BERT masking statistics (80/10/10, specials never
chosen) and agreement with the pipeline's collator; NSP pairs; BERT's total loss vs BertForPreTraining."""

import math
import random

import pytest
import torch
import torch.nn.functional as F

from companion.objectives import (
    IGNORE_INDEX,
    IS_NEXT,
    NOT_NEXT,
    MaskingConfig,
    bert_pretraining_loss,
    causal_lm_loss,
    mask_tokens,
    masked_lm_loss,
    nsp_pairs,
    z_loss_term,
)
from companion.pipeline import MaskedLMCollator


def test_causal_lm_loss_is_next_token_cross_entropy_by_hand():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(7, (2, 5), generator=g)
    labels[1, 3:] = IGNORE_INDEX  # padding at the end of row 1
    terms = [-F.log_softmax(logits[b, t], -1)[labels[b, t + 1]]
             for b in range(2) for t in range(4) if labels[b, t + 1] != IGNORE_INDEX]
    torch.testing.assert_close(causal_lm_loss(logits, labels), torch.stack(terms).mean())
    torch.testing.assert_close(causal_lm_loss(logits, labels, reduction="sum"), torch.stack(terms).sum())


def test_causal_lm_loss_matches_transformers_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=31, n_positions=16, n_embd=16, n_layer=1, n_head=2)).eval()
    ids = torch.randint(31, (3, 9))
    labels = ids.clone()
    labels[0, 6:] = IGNORE_INDEX
    out = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(causal_lm_loss(out.logits, labels), out.loss, rtol=1e-6, atol=1e-6)


def _loss_cases(dtype: torch.dtype):
    """(name, our loss, the same loss written with F.cross_entropy on the logits as they are) for each objective.

    Logits of scale 30 over 50 classes: a loss computed in float32 is off by ~1e-6 from the float64 one."""
    g = torch.Generator().manual_seed(0)
    logits = (30 * torch.randn(3, 6, 50, generator=g, dtype=torch.float64)).to(dtype)  # (B, T, V)
    labels = torch.randint(50, (3, 6), generator=g)
    labels[0, :2] = IGNORE_INDEX
    nsp_logits = (30 * torch.randn(3, 2, generator=g, dtype=torch.float64)).to(dtype)  # (B, 2)
    nsp_labels = torch.tensor([IS_NEXT, NOT_NEXT, IS_NEXT])
    up = torch.promote_types(dtype, torch.float32)
    flat = lambda x: x.reshape(-1, x.shape[-1]).to(up)  # noqa: E731
    return [
        ("causal", causal_lm_loss(logits, labels), F.cross_entropy(flat(logits[:, :-1]), labels[:, 1:].reshape(-1))),
        ("masked", masked_lm_loss(logits, labels), F.cross_entropy(flat(logits), labels.reshape(-1))),
        ("bert", bert_pretraining_loss(logits, labels, nsp_logits, nsp_labels),
         F.cross_entropy(flat(logits), labels.reshape(-1)) + F.cross_entropy(nsp_logits.to(up), nsp_labels)),
    ]


def test_float64_logits_give_a_float64_loss():
    # 6008bf5: the losses upcast with promote_types(dtype, float32); the former .float() rounded float64 to float32
    for name, ours, reference in _loss_cases(torch.float64):
        assert ours.dtype == reference.dtype == torch.float64, name
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-15, msg=name)


def test_bf16_logits_are_scored_in_float32():
    for name, ours, reference in _loss_cases(torch.bfloat16):  # reference: F.cross_entropy on the logits as float32
        assert ours.dtype == reference.dtype == torch.float32, name
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6, msg=name)


def test_loss_errors():
    with pytest.raises(ValueError, match=r"logits \(2, 4, 5\) and labels \(2, 3\) disagree"):
        causal_lm_loss(torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="every label equals ignore_index=-100"):
        causal_lm_loss(torch.zeros(1, 3, 5), torch.full((1, 3), IGNORE_INDEX))
    with pytest.raises(ValueError, match="at least 2 positions"):
        causal_lm_loss(torch.zeros(1, 1, 5), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'max'"):
        causal_lm_loss(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), reduction="max")


SPECIALS = (0, 1, 2, 3)  # pad, cls, mask, sep
MASK = 2


def test_masking_rates_80_10_10():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 1000, (40, 500), generator=g)  # 20 000 ordinary tokens
    corrupted, labels = mask_tokens(ids, MASK, 1000, SPECIALS, generator=g)
    chosen = labels != IGNORE_INDEX
    n = chosen.sum().item()
    # binomial standard deviations: rate 0.15 over 20 000 -> 0.0025; fractions of ~3000 -> <= 0.0073
    assert abs(n / ids.numel() - 0.15) < 4 * 0.0025
    assert torch.equal(labels[chosen], ids[chosen])
    masked = (corrupted == MASK) & chosen
    kept = (corrupted == ids) & chosen
    randomised = chosen & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.8) < 4 * math.sqrt(0.8 * 0.2 / n)
    assert abs(kept.sum().item() / n - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n) + 0.001  # + random draws equal to the original
    assert abs(randomised.sum().item() / n - 0.1) < 4 * math.sqrt(0.1 * 0.9 / n)
    assert torch.equal(corrupted[~chosen], ids[~chosen])
    assert not torch.isin(corrupted[randomised], torch.tensor(SPECIALS)).any()


def test_special_tokens_and_padding_never_masked():
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([[1, 5, 6, 7, 3, 0, 0], [1, 8, 3, 9, 9, 3, 0]])
    attention = (ids != 0).long()
    for _ in range(50):
        corrupted, labels = mask_tokens(ids, MASK, 20, SPECIALS, attention, MaskingConfig(probability=0.99), g)
        special = torch.isin(ids, torch.tensor(SPECIALS))
        assert (labels[special] == IGNORE_INDEX).all()
        assert torch.equal(corrupted[special], ids[special])


def test_mask_tokens_agrees_with_the_pipeline_collator():
    rows = [{"input_ids": [1, *range(4, 40), 3]}, {"input_ids": [1, *range(10, 30), 3]}]
    out = MaskedLMCollator(mask_id=MASK, vocab_size=50, pad_id=0, special_ids=SPECIALS,
                           generator=torch.Generator().manual_seed(5))(rows)
    ids = torch.zeros(2, 38, dtype=torch.long)  # the rows, padded with 0
    ids[0], ids[1, :22] = torch.tensor(rows[0]["input_ids"]), torch.tensor(rows[1]["input_ids"])
    corrupted, labels = mask_tokens(ids, MASK, 50, SPECIALS, out["attention_mask"],
                                    generator=torch.Generator().manual_seed(5))
    assert torch.equal(corrupted, out["input_ids"]) and torch.equal(labels, out["labels"])


def test_masking_config_errors():
    with pytest.raises(ValueError, match="probability must be in"):
        MaskingConfig(probability=0.0)
    with pytest.raises(ValueError, match="got 0.8 and 0.3"):
        MaskingConfig(random_fraction=0.3)
    with pytest.raises(ValueError, match="mask_id 60 is outside the vocabulary"):
        mask_tokens(torch.zeros(1, 3, dtype=torch.long), 60, 50)


DOCS = [["甲一", "甲二", "甲三"], ["乙一", "乙二"], ["丙一", "丙二", "丙三", "丙四"]]


def test_nsp_pairs_labels_are_true():
    doc_of = {s: i for i, d in enumerate(DOCS) for s in d}
    rows = [r for seed in range(30) for r in nsp_pairs(DOCS, random.Random(seed))]
    assert len(rows) == 30 * (2 + 1 + 3)
    for r in rows:
        if r["label"] == IS_NEXT:
            d = DOCS[doc_of[r["first"]]]
            assert d.index(r["second"]) == d.index(r["first"]) + 1
        else:
            assert r["label"] == NOT_NEXT and doc_of[r["second"]] != doc_of[r["first"]]
    share = sum(r["label"] for r in rows) / len(rows)  # 180 pairs, std 0.037
    assert abs(share - 0.5) < 0.15
    assert nsp_pairs(DOCS, random.Random(3)) == nsp_pairs(DOCS, random.Random(3))


def test_nsp_errors():
    with pytest.raises(ValueError, match="at least 2 non-empty documents, got 1"):
        nsp_pairs([["a", "b"], []], random.Random(0))
    with pytest.raises(ValueError, match="random_probability must be in"):
        nsp_pairs(DOCS, random.Random(0), random_probability=1.5)


def test_bert_pretraining_loss_matches_transformers():
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    model = BertForPreTraining(config).eval()
    ids = torch.randint(4, 40, (3, 10))
    corrupted, labels = mask_tokens(ids, MASK, 40, SPECIALS, config=MaskingConfig(probability=0.4),
                                    generator=torch.Generator().manual_seed(0))
    nsp = torch.tensor([0, 1, 1])
    out = model(input_ids=corrupted, labels=labels, next_sentence_label=nsp)
    ours = bert_pretraining_loss(out.prediction_logits, labels, out.seq_relationship_logits, nsp)
    torch.testing.assert_close(ours, out.loss, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="must be given together"):
        bert_pretraining_loss(out.prediction_logits, labels, out.seq_relationship_logits)


# ----------------------------------------------------------------------------------------- z-loss
def test_z_loss_is_coefficient_times_mean_logsumexp_squared():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 6, 9, generator=g, dtype=torch.float64) * 3
    labels = torch.randint(9, (2, 6), generator=g)
    labels[0, 4:] = IGNORE_INDEX
    counted = [(b, t) for b in range(2) for t in range(5) if labels[b, t + 1] != IGNORE_INDEX]
    z2 = torch.stack([torch.log(torch.exp(logits[b, t]).sum()) ** 2 for b, t in counted])  # direct, no logsumexp
    ce = causal_lm_loss(logits, labels)
    torch.testing.assert_close(causal_lm_loss(logits, labels, z_loss=1e-2), ce + 1e-2 * z2.mean(), rtol=1e-12, atol=0)
    torch.testing.assert_close(causal_lm_loss(logits, labels, reduction="sum", z_loss=0.5),
                               causal_lm_loss(logits, labels, reduction="sum") + 0.5 * z2.sum(), rtol=1e-12, atol=0)
    assert torch.equal(causal_lm_loss(logits, labels, z_loss=0.0), ce)  # off: exactly the plain loss


def test_z_loss_gradient_is_2_coef_logz_softmax():
    # d/dx [c * mean_i (log Z_i)^2] = (2c / N) * log Z_i * softmax(x_i) at each counted position i
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(1, 4, 5, generator=g, dtype=torch.float64) + 2).requires_grad_()
    labels = torch.randint(5, (1, 4), generator=g)
    c = 0.1
    (causal_lm_loss(logits, labels, z_loss=c) - causal_lm_loss(logits, labels)).backward()
    x = logits.detach()[0, :-1]  # (3, 5): the positions that predict a label
    expected = 2 * c / 3 * torch.logsumexp(x, -1, keepdim=True) * torch.softmax(x, -1)
    torch.testing.assert_close(logits.grad[0, :-1], expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(logits.grad[0, -1], torch.zeros(5, dtype=torch.float64))  # the last position is not counted
    assert torch.autograd.gradcheck(lambda z: z_loss_term(z, labels[:, 1:]), (logits.detach()[:, :-1].clone()
                                                                               .requires_grad_(),))


def test_z_loss_pulls_log_z_to_zero():
    # shifting every logit of a position by a constant leaves cross-entropy unchanged but not the z-loss
    logits = torch.randn(1, 3, 4, dtype=torch.float64)
    labels = torch.tensor([[0, 1, 2]])
    shifted = logits + 5.0
    torch.testing.assert_close(causal_lm_loss(shifted, labels), causal_lm_loss(logits, labels))
    assert z_loss_term(shifted[:, :-1], labels[:, 1:]) > z_loss_term(logits[:, :-1], labels[:, 1:])


def test_z_loss_errors():
    with pytest.raises(ValueError, match="every label equals ignore_index"):
        z_loss_term(torch.zeros(1, 3, 5), torch.full((1, 3), IGNORE_INDEX))
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'max'"):
        z_loss_term(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long), reduction="max")
