"""Total and active parameter counts of mixture-of-experts models: against sum(p.numel()) of our MoE GPT, of
transformers' Mixtral and OLMoE built on the meta device from the published configs, and against the published
sizes (Mixtral 8x7B: 46.7B total, 12.9B active; OLMoE-1B-7B: 6.9B total, 1.3B active)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from companion.models import GPT, GPTConfig, LlamaConfig, count_parameters, parameter_breakdown
from companion.nn.moe import MoEConfig


def _numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


MOE = MoEConfig(n_experts=4, top_k=2, d_expert=48)


@pytest.mark.parametrize("config", [
    replace(GPTConfig.tiny(), moe=MOE),
    replace(GPTConfig.tiny(), moe=replace(MOE, n_shared=1, score="sigmoid"), tie_embeddings=False),
])
def test_moe_gpt_breakdown_sums_to_numel(config):
    model = GPT(config)
    parts = parameter_breakdown(config)
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total") == _numel(model)


def test_active_parameters_leave_out_the_unchosen_experts():
    config = replace(GPTConfig.tiny(), moe=MOE)
    model = GPT(config)
    one_expert = _numel(model.blocks[0].ffn.experts[0])
    unused = config.n_layers * (MOE.n_experts - MOE.top_k) * one_expert
    assert count_parameters(config, active=True) == _numel(model) - unused
    dense = GPTConfig.tiny()
    assert count_parameters(dense, active=True) == count_parameters(dense)  # a dense model uses every weight


def test_dense_gpt_count_is_unchanged_by_the_moe_option():
    assert count_parameters(GPTConfig.gpt2_small()) == 124_439_808


def mixtral_8x7b() -> tuple[LlamaConfig, MoEConfig]:
    # Jiang et al. (2024), Table 1: dim 4096, 32 layers, head_dim 128, 32 heads, 8 kv heads, hidden_dim 14336,
    # vocab 32000, 8 experts, top-2
    return (LlamaConfig(vocab_size=32000, n_ctx=32768, n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8,
                        d_ff=14336, rope_base=1e6), MoEConfig(n_experts=8, top_k=2, d_expert=14336))


def olmoe_1b_7b() -> tuple[LlamaConfig, MoEConfig]:
    # Muennighoff et al. (2024), allenai/OLMoE-1B-7B-0924 config: 16 layers, width 2048, 16 heads, vocab 50304,
    # 64 experts of width 1024, top-8, probabilities not renormalised, untied output matrix
    return (LlamaConfig(vocab_size=50304, n_ctx=4096, n_layers=16, d_model=2048, n_heads=16, d_ff=1024),
            MoEConfig(n_experts=64, top_k=8, d_expert=1024, normalize=False))


def test_mixtral_8x7b_matches_transformers_and_the_published_sizes():
    from transformers import MixtralConfig, MixtralForCausalLM

    base, moe = mixtral_8x7b()
    hf = MixtralConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
                       tie_word_embeddings=False)
    with torch.device("meta"):
        reference = _numel(MixtralForCausalLM(hf))
    total, active = count_parameters(base, moe=moe), count_parameters(base, moe=moe, active=True)
    assert total == reference
    # Mistral AI's announcement: 46.7B total, 12.9B per token (the paper rounds to 47B and 13B)
    assert round(total / 1e9, 1) == 46.7
    assert round(active / 1e9, 1) == 12.9


def test_olmoe_1b_7b_matches_transformers_and_the_published_sizes():
    from transformers import OlmoeConfig, OlmoeForCausalLM

    base, moe = olmoe_1b_7b()
    hf = OlmoeConfig(vocab_size=50304, hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                     num_attention_heads=16, num_key_value_heads=16, num_experts=64, num_experts_per_tok=8,
                     tie_word_embeddings=False)
    with torch.device("meta"):
        reference = _numel(OlmoeForCausalLM(hf))
    total, active = count_parameters(base, moe=moe), count_parameters(base, moe=moe, active=True)
    qk_norm = 16 * (2048 + 2048)  # OLMoE's RMSNorm on q and k (width C and G * D), which our block does not have
    assert total + qk_norm == reference
    assert round(total / 1e9, 1) == 6.9  # Muennighoff et al. (2024): 6.9B total, 1.3B active
    assert round(active / 1e9, 1) == 1.3


def test_moe_errors():
    with pytest.raises(ValueError, match="moe is supported for GPT and Llama configs, got BertConfig"):
        from companion.models import BertConfig
        parameter_breakdown(BertConfig.tiny(), moe=MOE)
    with pytest.raises(TypeError, match="moe must be a MoEConfig or None, got dict"):
        replace(GPTConfig.tiny(), moe={"n_experts": 4})
