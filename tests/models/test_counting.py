"""Parameter counts from configs equal sum(p.numel()) of the built models (on the meta device: no memory) and the
published sizes; FLOPs per token follow Kaplan et al. (2020), Table 1."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from companion.models import (Bert, BertConfig, BertForPreTraining, GPT, GPTConfig, Llama, LlamaConfig, T5, T5Config,
                              count_parameters, flops_per_token, parameter_breakdown)


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) parameters are yielded once


def _meta(cls, config):
    with torch.device("meta"):
        return cls(config)


# published totals: GPT-2 (HF model cards: 124M, 355M), BERT-base 110M (Devlin et al.), Llama-2-7B 6.74B (HF
# meta-llama/Llama-2-7b-hf: 6,738,415,616), T5-small 60M
@pytest.mark.parametrize("cls, config, published, rel", [
    (GPT, GPTConfig.gpt2_small(), 124e6, 0.005),
    (GPT, GPTConfig.gpt2_medium(), 355e6, 0.005),
    (Bert, BertConfig.base(), 110e6, 0.01),
    (Llama, LlamaConfig.llama2_7b(), 6.738415616e9, 1e-12),
    (T5, T5Config.small(), 60e6, 0.01),
], ids=["gpt2-124M", "gpt2-355M", "bert-base", "llama2-7b", "t5-small"])
def test_published_sizes(cls, config, published, rel):
    model = _meta(cls, config)
    assert count_parameters(config) == _numel(model)
    assert count_parameters(config) == pytest.approx(published, rel=rel)


def test_gpt2_exact_counts_from_the_literature():
    # the exact totals of the Hugging Face gpt2 and gpt2-medium checkpoints (tied head counted once)
    assert count_parameters(GPTConfig.gpt2_small()) == 124_439_808
    assert count_parameters(GPTConfig.gpt2_medium()) == 354_823_168
    assert count_parameters(BertConfig.base()) == 109_482_240


@pytest.mark.parametrize("cls, config, kw", [
    (GPT, GPTConfig.tiny(), {}),
    (GPT, replace(GPTConfig.tiny(), tie_embeddings=False, d_ff=100), {}),
    (Llama, LlamaConfig.tiny(), {}),
    (Llama, replace(LlamaConfig.tiny(), tie_embeddings=True, n_kv_heads=1), {}),
    (Bert, BertConfig.tiny(), {}),
    (BertForPreTraining, BertConfig.tiny(), {"pretraining_heads": True}),
    (T5, T5Config.tiny(), {}),
    (T5, replace(T5Config.tiny(), n_decoder_layers=3), {}),
])
def test_breakdown_sums_to_numel(cls, config, kw):
    parts = parameter_breakdown(config, **kw)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total") == _numel(cls(config))


def test_non_embedding_count_matches_the_modules():
    config = LlamaConfig.tiny()
    model = Llama(config)
    outside = model.tok_emb.weight.numel() + model.lm_head.weight.numel()
    assert count_parameters(config, embeddings=False) == _numel(model) - outside


def test_flops_per_token_kaplan_formula():
    config = GPTConfig.gpt2_small()
    # N without embeddings: 12 layers * (12 C^2 + 13 C) + final LayerNorm 2C
    c = 768
    n = 12 * (12 * c * c + 13 * c) + 2 * c
    assert count_parameters(config, embeddings=False) == n
    assert flops_per_token(config) == 6 * n + 6 * 12 * 1024 * c
    assert flops_per_token(config, training=False) == 2 * n + 2 * 12 * 1024 * c
    assert flops_per_token(config, n_ctx=1) < flops_per_token(config)


def test_flops_errors():
    with pytest.raises(ValueError, match="n_ctx must be a positive int, got 0"):
        flops_per_token(GPTConfig.tiny(), n_ctx=0)
    with pytest.raises(TypeError, match="got dict"):
        parameter_breakdown({})
