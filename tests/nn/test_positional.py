"""companion.nn.positional against the papers' formulas, transformers' Llama RoPE and BLOOM's ALiBi slopes."""

import math

import pytest
import torch

from companion.nn.attention import scaled_dot_product_attention
from companion.nn.positional import (
    LearnedPositionalEmbedding,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_bias,
    alibi_slopes,
    sinusoidal_positions,
)


def test_sinusoidal_matches_the_paper_formula():
    table = sinusoidal_positions(12, 8)
    for pos in range(12):
        for i in range(4):
            angle = pos / 10000 ** (2 * i / 8)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_additive_encodings_respect_offset_and_length():
    enc = SinusoidalPositionalEncoding(8, max_len=10)
    x = torch.zeros(1, 3, 8)
    torch.testing.assert_close(enc(x, offset=4)[0], sinusoidal_positions(10, 8)[4:7])
    with pytest.raises(ValueError, match="positions up to 11 exceed max_len=10"):
        enc(torch.zeros(1, 4, 8), offset=7)
    learned = LearnedPositionalEmbedding(8, max_len=5)
    torch.testing.assert_close(learned(x, offset=2)[0], learned.weight[2:5].detach())
    with pytest.raises(ValueError, match="exceed max_len=5"):
        learned(torch.zeros(1, 6, 8))
    with pytest.raises(ValueError, match="even dim"):
        sinusoidal_positions(4, 7)


@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_rope_matches_transformers_llama(base):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, intermediate_size=96,
                         num_hidden_layers=1, vocab_size=16, max_position_embeddings=64,
                         rope_parameters={"rope_type": "default", "rope_theta": base})
    q, k = torch.randn(2, 4, 11, 16), torch.randn(2, 4, 11, 16)
    position_ids = torch.tensor([list(range(11)), list(range(20, 31))])  # (B, T): per-sequence positions
    cos, sin = LlamaRotaryEmbedding(config)(q, position_ids)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    rope = RotaryEmbedding(16, base=base)
    torch.testing.assert_close(rope(q, position_ids), ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rope(k, position_ids), ref_k, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(32)
    q, k = torch.randn(1, 1, 1, 32), torch.randn(1, 1, 1, 32)

    def score(m: int, n: int) -> float:
        return (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum().item()

    for m, n in [(5, 2), (0, 7), (30, 30)]:
        for shift in (1, 13, 100):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), rel=1e-4, abs=1e-4)
    assert abs(score(5, 2) - score(5, 3)) > 1e-3  # but it does depend on m - n
    x = torch.randn(2, 3, 6, 32)
    torch.testing.assert_close(rope(x, torch.arange(6)).norm(dim=-1), x.norm(dim=-1))  # a rotation
    with pytest.raises(ValueError, match="even head_dim"):
        RotaryEmbedding(7)


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 8, 12, 16])
def test_alibi_slopes_match_bloom(n_heads):
    from transformers.models.bloom.modeling_bloom import _get_alibi_slopes

    torch.testing.assert_close(alibi_slopes(n_heads), _get_alibi_slopes(n_heads, torch.device("cpu")))


def test_alibi_slopes_for_eight_heads_are_the_papers():
    assert alibi_slopes(8).tolist() == [2.0**-i for i in range(1, 9)]


def test_symmetric_alibi_equals_the_papers_causal_bias():
    # Paper: bias -m * (i - j) for j <= i. BLOOM adds +m * j instead; both differ per row by a constant.
    h, t = 4, 6
    q, k, v = torch.randn(1, h, t, 8), torch.randn(1, h, t, 8), torch.randn(1, h, t, 8)
    ours = scaled_dot_product_attention(q, k, v, alibi_bias(h, torch.arange(t), torch.arange(t)), is_causal=True)
    bloom_style = alibi_slopes(h)[:, None, None] * torch.arange(t)[None, None, :].float()  # (H, 1, S)
    ref = scaled_dot_product_attention(q, k, v, bloom_style.expand(h, t, t), is_causal=True)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert alibi_bias(h, torch.arange(3)[None].expand(2, 3), torch.arange(5)).shape == (2, h, 3, 5)
