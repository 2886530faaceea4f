"""Model-level behaviour: KV cache agrees with full recomputation, masks do what each family needs, T5 buckets match
transformers, bad input is named, and the companion.nn options added for these models are right."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from companion.models import (Bert, BertConfig, GPT, GPTConfig, Llama, LlamaConfig, T5, T5Config, greedy_generate,
                              relative_position_bucket)
from companion.nn import AttentionConfig, FeedForward, MultiHeadAttention, RopeScaling

SCALED_LLAMA = replace(LlamaConfig.tiny(), rope_scaling=RopeScaling.llama3(8.0, 1.0, 4.0, 4))  # 16 tokens > 4


@pytest.fixture()
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cls, config", [(GPT, GPTConfig.tiny()), (Llama, LlamaConfig.tiny()), (Llama, SCALED_LLAMA)],
                         ids=["gpt", "llama", "llama_rope_scaled"])
def test_kv_cache_gives_the_same_tokens_and_logits(cls, config, ids):
    torch.manual_seed(0)
    model = cls(config).eval()
    assert torch.equal(greedy_generate(model, ids, 6), greedy_generate(model, ids, 6, use_cache=False))


@pytest.mark.parametrize("cls, config", [(GPT, GPTConfig.tiny()), (Llama, LlamaConfig.tiny())], ids=["gpt", "llama"])
def test_decoders_are_causal(cls, config, ids):
    torch.manual_seed(0)
    model = cls(config).eval()
    changed = ids.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % 256
    with torch.no_grad():
        a, b = model(ids), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])  # earlier positions never see later tokens
    assert not torch.allclose(a[:, 6:], b[:, 6:])


def test_bert_is_bidirectional_and_ignores_padding(ids):
    torch.manual_seed(0)
    model = Bert(BertConfig.tiny()).eval()
    changed = ids.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % 256
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert not torch.allclose(model(ids)[0][:, :2], model(changed)[0][:, :2])  # early positions see late tokens
        mask[:, 8:] = 0  # ...unless the late tokens are padding
        torch.testing.assert_close(model(ids, attention_mask=mask)[0][:, :8], model(changed, attention_mask=mask)[0][:, :8])


def test_t5_relative_buckets_match_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    rel = torch.arange(-300, 300)[None, :]
    for bidirectional in (True, False):
        for nb, md in ((32, 128), (8, 16)):
            ref = T5Attention._relative_position_bucket(rel, bidirectional=bidirectional, num_buckets=nb, max_distance=md)
            assert torch.equal(relative_position_bucket(rel, bidirectional, nb, md), ref)


def test_t5_decoder_is_causal_and_sees_the_source(ids):
    torch.manual_seed(0)
    model = T5(T5Config.tiny()).eval()
    dec = ids[:, :6]
    later = dec.clone()
    later[:, 4:] = (later[:, 4:] + 1) % 256
    other_source = (ids + 1) % 256
    with torch.no_grad():
        torch.testing.assert_close(model(ids, dec)[:, :4], model(ids, later)[:, :4])
        assert not torch.allclose(model(ids, dec)[:, 0], model(other_source, dec)[:, 0])


@pytest.mark.parametrize("cls, config, n_ctx", [(GPT, GPTConfig.tiny(), 64), (Llama, LlamaConfig.tiny(), 64),
                                                (Bert, BertConfig.tiny(), 64)])
def test_too_long_sequences_name_both_lengths(cls, config, n_ctx):
    model = cls(config)
    with pytest.raises(ValueError, match=rf"sequence length 70 exceeds the context length n_ctx={n_ctx}"):
        model(torch.zeros(1, 70, dtype=torch.long))


def test_llama_rope_scaling_is_carried_by_the_block_config():
    model = Llama(SCALED_LLAMA)
    for block in model.blocks:
        assert block.config == SCALED_LLAMA.block() and block.self_attn.config.rope_scaling == SCALED_LLAMA.rope_scaling
        assert block.self_attn.rope.scaling == SCALED_LLAMA.rope_scaling
    assert Llama(LlamaConfig.tiny()).blocks[0].self_attn.rope.scaling is None


def test_config_validation_names_values():
    with pytest.raises(ValueError, match="d_model must be divisible by n_heads, got d_model=64 and n_heads=5"):
        replace(GPTConfig.tiny(), n_heads=5)
    with pytest.raises(ValueError, match="n_kv_heads must divide n_heads, got n_heads=4 and n_kv_heads=3"):
        replace(LlamaConfig.tiny(), n_kv_heads=3)
    with pytest.raises(ValueError, match="rope_scaling must be a RopeScaling or None, got 'linear'"):
        replace(LlamaConfig.tiny(), rope_scaling="linear")
    with pytest.raises(ValueError, match="n_layers must be positive, got 0"):
        replace(BertConfig.tiny(), n_layers=0)
    with pytest.raises(ValueError, match="n_decoder_layers must be positive, got 0"):
        replace(T5Config.tiny(), n_decoder_layers=0)


def test_gelu_tanh_is_gpt2s_activation():
    torch.manual_seed(0)
    ffn = FeedForward(8, 16, kind="gelu_tanh")
    x = torch.randn(3, 8)
    h = ffn.up(x)
    new_gelu = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h.pow(3))))  # GPT-2's formula
    torch.testing.assert_close(ffn(x), ffn.down(new_gelu))
    assert not torch.allclose(ffn(x), ffn.down(F.gelu(h)), atol=1e-6)  # differs from the exact GELU


@pytest.mark.parametrize("backend", ["math", "torch"])
def test_attention_scale_option(backend):
    torch.manual_seed(0)
    attn = MultiHeadAttention(AttentionConfig(d_model=16, n_heads=2, scale=1.0, bias=False, backend=backend))
    x = torch.randn(2, 5, 16)
    q, k, v = (p(x).view(2, 5, 2, 8).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    ref = torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v  # no 1/sqrt(D), as in T5
    torch.testing.assert_close(attn(x)[0], attn.out_proj(ref.transpose(1, 2).reshape(2, 5, 16)))
    with pytest.raises(ValueError, match="scale must be positive"):
        AttentionConfig(d_model=16, n_heads=2, scale=0.0)
