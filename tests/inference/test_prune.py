"""Pruning: magnitude masks equal torch.nn.utils.prune's; structured FFN pruning shrinks the matrices and
computes exactly what the masked model computes."""

import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

from companion import GPT, GPTConfig, Llama, LlamaConfig
from companion.inference.prune import (
    ffn_importance,
    magnitude_masks,
    magnitude_prune,
    mask_ffn,
    prunable_linears,
    prune_ffn,
    sparsity_of,
)
from companion.inference.quantize import state_dict_bytes


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return Llama(LlamaConfig.tiny()).eval()


@pytest.mark.parametrize("sparsity", [0.3, 0.75])
def test_layer_masks_equal_l1_unstructured(sparsity):
    model, ref = tiny_llama(), tiny_llama()
    masks = magnitude_prune(model, sparsity, "layer")
    for name, m in prunable_linears(ref).items():
        tprune.l1_unstructured(m, "weight", amount=sparsity)
        assert torch.equal(masks[name], m.weight_mask.bool()), name
        torch.testing.assert_close(prunable_linears(model)[name].weight, m.weight, atol=0, rtol=0)
    assert abs(sparsity_of(model) - sparsity) < 0.01


def test_global_masks_equal_global_unstructured():
    model, ref = tiny_llama(), tiny_llama()
    with torch.no_grad():  # one layer with larger weights: global pruning leaves it denser
        for m in (model, ref):
            m.blocks[0].ffn.up.weight.mul_(3)
    masks = magnitude_prune(model, 0.6, "global")
    linears = prunable_linears(ref)
    tprune.global_unstructured([(m, "weight") for m in linears.values()], pruning_method=tprune.L1Unstructured,
                               amount=0.6)
    for name, m in linears.items():
        assert torch.equal(masks[name], m.weight_mask.bool()), name
    layer_sparsity = {name: 1 - float(mk.float().mean()) for name, mk in masks.items()}
    assert layer_sparsity["blocks.0.ffn.up"] < min(v for k, v in layer_sparsity.items() if k != "blocks.0.ffn.up") - 0.2
    assert abs(sparsity_of(model) - 0.6) < 0.01


def test_lm_head_skipped_by_default():
    model = GPT(GPTConfig.tiny())
    magnitude_prune(model, 0.5)
    assert "lm_head" not in prunable_linears(model)
    assert int((model.tok_emb.weight == 0).sum()) == 0  # tied table untouched


@pytest.mark.parametrize("make", [tiny_llama, lambda: GPT(GPTConfig.tiny()).eval()])
def test_structured_prune_equals_masked_model(make):
    torch.manual_seed(0)
    model = make()
    masked = make()
    masked.load_state_dict(model.state_dict())
    idx = torch.randint(0, model.config.vocab_size, (2, 12))
    before = state_dict_bytes(model)
    hidden = model.blocks[0].ffn.down.in_features
    kept = prune_ffn(model, 0.5)
    mask_ffn(masked, kept)
    assert model.blocks[0].ffn.up.weight.shape[0] == model.blocks[0].ffn.down.weight.shape[1] == round(hidden / 2)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), masked(idx), atol=1e-5, rtol=1e-5)
    ffn_bytes = sum(4 * p.numel() for n, p in masked.named_parameters() if ".ffn." in n and "bias" not in n)
    assert state_dict_bytes(model) < before - 0.45 * ffn_bytes


def test_structured_keeps_most_important_units():
    model = tiny_llama()
    ffn = model.blocks[0].ffn
    score = ffn_importance(ffn)
    kept = prune_ffn(model, 0.25)["blocks.0.ffn"]
    dropped = torch.ones_like(score, dtype=torch.bool)
    dropped[kept] = False
    assert score[kept].min() >= score[dropped].max()


def test_bad_sparsity_raises():
    with pytest.raises(ValueError, match="sparsity must lie in \\[0, 1\\), got 1.0"):
        magnitude_masks({"w": torch.ones(3)}, 1.0)
    with pytest.raises(ValueError, match="scope must be 'layer' or 'global', got 'row'"):
        magnitude_masks({"w": torch.ones(3)}, 0.5, "row")
    with pytest.raises(ValueError, match="sparsity must lie"):
        prune_ffn(tiny_llama(), -0.1)
