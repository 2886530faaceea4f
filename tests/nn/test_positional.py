"""companion.nn.positional against the papers' formulas, transformers' Llama RoPE and BLOOM's ALiBi slopes."""

import math

import pytest
import torch

from companion.nn.attention import scaled_dot_product_attention
from companion.nn.positional import (
    LearnedPositionalEmbedding,
    RopeScaling,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_bias,
    alibi_slopes,
    rope_frequencies,
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


def _llama3_frequency(theta: float, factor: float, low: float, high: float, original: int) -> float:
    """Llama 3.1's rule for one frequency, as in Meta's reference ``apply_scaling``, in Python floats (float64)."""
    wavelen = 2 * math.pi / theta
    if wavelen < original / high:
        return theta
    if wavelen > original / low:
        return theta / factor
    smooth = (original / wavelen - low) / (high - low)
    return (1 - smooth) * theta / factor + smooth * theta


def _rope_by_formula(x: torch.Tensor, positions: list[int], thetas: list[float]) -> torch.Tensor:
    """Rotate pairs (i, i + D/2) of x (..., T, D) by positions[t] * thetas[i], angles from Python's math (float64)."""
    half = x.shape[-1] // 2
    out = torch.empty_like(x)
    for t, p in enumerate(positions):
        for i, theta in enumerate(thetas):
            c, s = math.cos(p * theta), math.sin(p * theta)
            a, b = x[..., t, i], x[..., t, i + half]
            out[..., t, i], out[..., t, i + half] = a * c - b * s, b * c + a * s
    return out


SCALINGS = {"none": None, "linear": RopeScaling.linear(2.0), "llama3": RopeScaling.llama3(8.0, 1.0, 4.0, 32)}


@pytest.mark.parametrize("name", SCALINGS)
def test_rope_float64_matches_the_formula(name):
    # float64 input -> float64 angles: within 1e-12 of the formula (float32 angles are off by ~1e-7 * position).
    scaling, d, base = SCALINGS[name], 16, 10000.0
    thetas = [base ** (-2 * i / d) for i in range(d // 2)]
    if name == "linear":
        thetas = [t / 2.0 for t in thetas]
    elif name == "llama3":
        thetas = [_llama3_frequency(t, 8.0, 1.0, 4.0, 32) for t in thetas]
        regimes = {2 * math.pi / t < 32 / 4 for t in thetas}, {2 * math.pi / t > 32 / 1 for t in thetas}
        assert regimes == ({True, False}, {True, False})  # kept, interpolated and divided frequencies all occur
    torch.testing.assert_close(rope_frequencies(d, base, scaling, torch.float64),
                               torch.tensor(thetas, dtype=torch.float64), rtol=1e-15, atol=0)
    x = torch.randn(2, 3, 5, d, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    positions = [0, 1, 63, 500, 4097]
    ours = RotaryEmbedding(d, base=base, scaling=scaling).double()(x, torch.tensor(positions))
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, _rope_by_formula(x, positions, thetas), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["linear", "llama3"])
def test_rope_scaling_frequencies_match_transformers(name):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = SCALINGS[name]
    fields = {"factor": 2.0} if name == "linear" else {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 32}
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=1, vocab_size=16,
                         max_position_embeddings=64, rope_parameters={"rope_type": name, "rope_theta": 10000.0, **fields})
    theirs, attention_factor = ROPE_INIT_FUNCTIONS[name](config, "cpu")
    assert attention_factor == 1.0  # neither scheme rescales cos/sin
    assert torch.equal(rope_frequencies(16, 10000.0, scaling), theirs)  # float32, same operations: bit for bit
    assert not torch.allclose(rope_frequencies(16, 10000.0), theirs)  # and the scaling does change them


def test_rope_scaling_validation_names_values():
    with pytest.raises(ValueError, match="got 'longrope'"):
        RopeScaling("longrope", 4.0)
    with pytest.raises(ValueError, match="factor must be >= 1, got 0.5"):
        RopeScaling.linear(0.5)
    with pytest.raises(ValueError, match="low_freq_factor=4.0 and high_freq_factor=1.0"):
        RopeScaling.llama3(8.0, 4.0, 1.0)
    with pytest.raises(ValueError, match="original_max_position_embeddings must be positive, got 0"):
        RopeScaling.llama3(original_max_position_embeddings=0)
    with pytest.raises(ValueError, match="scaling must be a RopeScaling"):
        RotaryEmbedding(16, scaling={"rope_type": "linear", "factor": 2.0})


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
