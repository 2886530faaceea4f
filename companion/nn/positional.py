"""Positional information for attention: sinusoidal, learned, rotary (RoPE) and linear biases (ALiBi).

Sinusoidal from Vaswani et al. (2017); RoPE from Su et al. (2021, RoFormer), in the "rotate half" layout of
LLaMA / Hugging Face (pairs (i, i + D/2) rotate together, a fixed permutation of the paper's interleaved pairs);
ALiBi from Press et al. (2022), with the paper's slopes, including its rule for head counts that are not powers of
two. Sinusoidal and learned encodings are added to the token embeddings; RoPE and ALiBi act inside attention.
RoPE's frequencies can be rescaled for longer contexts as Hugging Face's ``rope_type`` "linear" (position
interpolation, Chen et al., 2023) and "llama3" (Llama 3.1) do; angles are computed in float32, or in float64 for
float64 input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn


def sinusoidal_positions(n_positions: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """(n_positions, dim) table with PE[p, 2i] = sin(p / base^(2i/dim)) and PE[p, 2i+1] = cos(same)."""
    if n_positions < 1 or dim < 2 or dim % 2:
        raise ValueError(f"need n_positions >= 1 and an even dim >= 2, got n_positions={n_positions!r}, dim={dim!r}")
    position = torch.arange(n_positions, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    angle = position * inv_freq  # (P, dim/2)
    table = torch.empty(n_positions, dim)
    table[:, 0::2] = torch.sin(angle)
    table[:, 1::2] = torch.cos(angle)
    return table  # (P, C)


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoidal table to (B, T, C) embeddings; positions start at ``offset``."""

    def __init__(self, dim: int, max_len: int = 4096, base: float = 10000.0) -> None:
        super().__init__()
        self.max_len = max_len
        self.register_buffer("table", sinusoidal_positions(max_len, dim, base), persistent=False)  # (P, C)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = x.shape[1]
        if offset + t > self.max_len:
            raise ValueError(f"positions up to {offset + t} exceed max_len={self.max_len}")
        return x + self.table[offset : offset + t].to(x.dtype)


class LearnedPositionalEmbedding(nn.Module):
    """A trainable (max_len, C) table added to (B, T, C) embeddings (GPT-2, BERT)."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.randn(max_len, dim) * 0.02)  # (P, C)

    def forward(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        t = x.shape[1]
        if offset + t > self.max_len:
            raise ValueError(f"positions up to {offset + t} exceed max_len={self.max_len}")
        return x + self.weight[offset : offset + t]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


@dataclass(frozen=True)
class RopeScaling:
    """Stretches RoPE's wavelengths so that a model pretrained on short contexts reads longer ones (HF rope_scaling).

    "linear" divides every frequency by ``factor`` (position interpolation). "llama3" (Llama 3.1/3.2) divides only
    the low frequencies, whose wavelength exceeds ``original_max_position_embeddings / low_freq_factor``; keeps the
    high ones, with wavelength below ``original_max_position_embeddings / high_freq_factor``; and interpolates
    smoothly in between. Presets: `linear`, `llama3`.
    """

    rope_type: Literal["linear", "llama3"]  # the scaling rule, named as in Hugging Face's rope_type
    factor: float  # how much longer the contexts are than in pretraining (>= 1)
    low_freq_factor: float = 1.0  # llama3 only: wavelengths above original / low_freq_factor are divided by factor
    high_freq_factor: float = 4.0  # llama3 only: wavelengths below original / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3 only: the context length of pretraining

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(f"rope_type must be 'linear' or 'llama3', got {self.rope_type!r}")
        if not self.factor >= 1:
            raise ValueError(f"RoPE scaling factor must be >= 1, got {self.factor!r}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"need 0 < low_freq_factor < high_freq_factor, got "
                             f"low_freq_factor={self.low_freq_factor!r} and high_freq_factor={self.high_freq_factor!r}")
        if self.original_max_position_embeddings < 1:
            raise ValueError(f"original_max_position_embeddings must be positive, got "
                             f"{self.original_max_position_embeddings!r}")

    @classmethod
    def linear(cls, factor: float) -> RopeScaling:
        return cls("linear", factor)

    @classmethod
    def llama3(cls, factor: float = 8.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
               original_max_position_embeddings: int = 8192) -> RopeScaling:
        """Defaults are Llama 3.1's (8K pretraining context stretched to 128K)."""
        return cls("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)


def rope_frequencies(head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (D/2,) rotation frequencies theta_i = base^(-2i/D), rescaled by ``scaling``, computed in ``dtype``.

    The operations follow transformers' ``_compute_linear_scaling_rope_parameters`` and ``_compute_llama3_parameters``
    step by step, so that float32 results agree bit for bit.
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))  # (D/2,)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor  # the same as dividing the positions by factor
    original, low, high = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # (D/2,) positions per full turn
    smooth = (original / wavelen - low) / (high - low)  # 0 at wavelength original/low, 1 at original/high
    mixed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / scaling.factor, mixed)
    return torch.where(wavelen < original / high, inv_freq, scaled)  # (D/2,)


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each pair (x_i, x_{i+D/2}) of a query/key by the angle p * theta_i, theta_i = base^(-2i/D).

    Then <RoPE(q, m), RoPE(k, n)> depends on the positions only through m - n. ``scaling`` rescales the theta_i
    (see `RopeScaling`). Angles are computed in float32 for float32/bf16/fp16 input and in float64 for float64 input.
    forward(x, positions): x (B, H, T, D), positions (T,) or (B, T) -> rotated x of the same shape.
    """

    def __init__(self, head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None) -> None:
        super().__init__()
        if head_dim < 2 or head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim >= 2, got {head_dim!r}")
        if scaling is not None and not isinstance(scaling, RopeScaling):
            raise ValueError(f"scaling must be a RopeScaling or None, got {scaling!r}")
        self.head_dim, self.base, self.scaling = head_dim, base, scaling
        self.register_buffer("inv_freq", rope_frequencies(head_dim, base, scaling), persistent=False)  # (D/2,)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the rotation angles, each (..., T, D) for positions (..., T); float64 if ``dtype`` is."""
        if dtype == torch.float64:  # frequencies recomputed in float64 (the buffer holds float32 values)
            inv_freq = rope_frequencies(self.head_dim, self.base, self.scaling, torch.float64).to(positions.device)
            angle = positions.to(torch.float64)[..., None] * inv_freq  # (..., T, D/2)
        else:
            angle = positions.to(torch.float32)[..., None] * self.inv_freq  # (..., T, D/2)
        angle = torch.cat([angle, angle], dim=-1)  # (..., T, D)
        return angle.cos(), angle.sin()

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if positions.shape[-1] != x.shape[-2]:
            raise ValueError(f"positions of shape {tuple(positions.shape)} do not match T={x.shape[-2]} of x")
        cos, sin = self.cos_sin(positions, torch.promote_types(x.dtype, torch.float32))
        if cos.dim() == 3:  # (B, T, D) -> (B, 1, T, D), shared by the heads
            cos, sin = cos[:, None], sin[:, None]
        return (x * cos + rotate_half(x) * sin).to(x.dtype)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The ALiBi head slopes: 2^(-8h/n) for h = 1..n when n is a power of two; otherwise the slopes of the closest
    smaller power of two followed by every other slope of the next power of two (Press et al., 2022)."""
    if n_heads < 1:
        raise ValueError(f"n_heads must be positive, got {n_heads!r}")

    def power_of_two(n: int) -> list[float]:
        return [2.0 ** (-8.0 * h / n) for h in range(1, n + 1)]

    closest = 2 ** math.floor(math.log2(n_heads))
    slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)  # (H,)


def alibi_bias(
    n_heads: int,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Additive bias -slope_h * |i - j| for query position i and key position j: (H, T, S), or (B, H, T, S) for
    (B, T) query positions. Under a causal mask only j <= i is used, which is the paper's bias."""
    slopes = alibi_slopes(n_heads).to(device)  # (H,)
    distance = (query_positions[..., :, None] - key_positions[None, :]).abs().to(torch.float32)  # (..., T, S)
    return -slopes[:, None, None] * distance.unsqueeze(-3)  # (..., H, T, S)
