"""Positional information for attention: sinusoidal, learned, rotary (RoPE) and linear biases (ALiBi).

Sinusoidal from Vaswani et al. (2017); RoPE from Su et al. (2021, RoFormer), in the "rotate half" layout of
LLaMA / Hugging Face (pairs (i, i + D/2) rotate together, a fixed permutation of the paper's interleaved pairs);
ALiBi from Press et al. (2022), with the paper's slopes, including its rule for head counts that are not powers of
two. Sinusoidal and learned encodings are added to the token embeddings; RoPE and ALiBi act inside attention.
RoPE's frequencies can be rescaled for longer contexts as Hugging Face's ``rope_type`` "linear" (position
interpolation, Chen et al., 2023), "llama3" (Llama 3.1), "dynamic" (NTK-aware base stretching, bloc97 2023, with the
stretch chosen from the current length) and "yarn" (Peng et al., 2023) do, plus "ntk" (the static NTK-aware rule);
angles are computed in float32, or in float64 for float64 input.
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
    smoothly in between. "ntk" (NTK-aware, static) raises the base to base * factor^(D/(D-2)), which keeps the
    highest frequency and divides the lowest by exactly ``factor``. "dynamic" is Hugging Face's dynamic NTK: the same
    rule with the stretch alpha = factor * L / original - (factor - 1) computed from the current length L (no change
    while L <= original). "yarn" (Peng et al., 2023) divides by ``factor`` the dimensions that turn fewer than
    ``beta_slow`` times over the original context, keeps those that turn more than ``beta_fast`` times, ramps
    linearly in between, and multiplies cos/sin by ``attention_factor`` (default 0.1 ln(factor) + 1), which scales
    the attention logits by its square. Presets: `linear`, `llama3`, `ntk`, `dynamic`, `yarn`.
    """

    rope_type: Literal["linear", "llama3", "ntk", "dynamic", "yarn"]  # the scaling rule (HF rope_type, plus "ntk")
    factor: float  # how much longer the contexts are than in pretraining (>= 1)
    low_freq_factor: float = 1.0  # llama3 only: wavelengths above original / low_freq_factor are divided by factor
    high_freq_factor: float = 4.0  # llama3 only: wavelengths below original / high_freq_factor are kept
    original_max_position_embeddings: int = 8192  # llama3, dynamic, yarn: the context length of pretraining
    beta_fast: float = 32.0  # yarn only: dimensions turning more often than this over the original context are kept
    beta_slow: float = 1.0  # yarn only: dimensions turning less often than this are divided by factor
    attention_factor: float | None = None  # yarn only: multiplies cos/sin (None: 0.1 ln(factor) + 1)
    truncate: bool = True  # yarn only: round the ramp's ends to whole dimensions (as Hugging Face does by default)

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3", "ntk", "dynamic", "yarn"):
            raise ValueError(f"rope_type must be 'linear', 'llama3', 'ntk', 'dynamic' or 'yarn', got {self.rope_type!r}")
        if not self.factor >= 1:
            raise ValueError(f"RoPE scaling factor must be >= 1, got {self.factor!r}")
        if not 0 < self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"need 0 < low_freq_factor < high_freq_factor, got "
                             f"low_freq_factor={self.low_freq_factor!r} and high_freq_factor={self.high_freq_factor!r}")
        if self.original_max_position_embeddings < 1:
            raise ValueError(f"original_max_position_embeddings must be positive, got "
                             f"{self.original_max_position_embeddings!r}")
        if not 0 < self.beta_slow < self.beta_fast:
            raise ValueError(f"need 0 < beta_slow < beta_fast, got beta_slow={self.beta_slow!r} and "
                             f"beta_fast={self.beta_fast!r}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"attention_factor must be positive (or None), got {self.attention_factor!r}")

    @property
    def attention_scaling(self) -> float:
        """The factor cos and sin are multiplied by (so q.k by its square): YaRN's sqrt(1/t), otherwise 1."""
        if self.rope_type != "yarn":
            return 1.0
        if self.attention_factor is not None:
            return self.attention_factor
        return 0.1 * math.log(self.factor) + 1.0 if self.factor > 1 else 1.0

    @classmethod
    def linear(cls, factor: float) -> RopeScaling:
        return cls("linear", factor)

    @classmethod
    def llama3(cls, factor: float = 8.0, low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
               original_max_position_embeddings: int = 8192) -> RopeScaling:
        """Defaults are Llama 3.1's (8K pretraining context stretched to 128K)."""
        return cls("llama3", factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)

    @classmethod
    def ntk(cls, factor: float) -> RopeScaling:
        """Static NTK-aware scaling: base -> base * factor^(D/(D-2)) for every length."""
        return cls("ntk", factor)

    @classmethod
    def dynamic(cls, factor: float, original_max_position_embeddings: int) -> RopeScaling:
        """Hugging Face's dynamic NTK: the NTK stretch grows with the current length beyond the original one."""
        return cls("dynamic", factor, original_max_position_embeddings=original_max_position_embeddings)

    @classmethod
    def yarn(cls, factor: float, original_max_position_embeddings: int, beta_fast: float = 32.0,
             beta_slow: float = 1.0, attention_factor: float | None = None, truncate: bool = True) -> RopeScaling:
        """YaRN; the defaults of beta_fast, beta_slow and the attention factor are the paper's."""
        return cls("yarn", factor, original_max_position_embeddings=original_max_position_embeddings,
                   beta_fast=beta_fast, beta_slow=beta_slow, attention_factor=attention_factor, truncate=truncate)


def _yarn_ramp(scaling: RopeScaling, head_dim: int, base: float, dtype: torch.dtype) -> torch.Tensor:
    """(D/2,) share of extrapolation per frequency: 1 keeps theta_i, 0 divides it by factor (transformers' steps)."""

    def dimension(rotations: float) -> float:  # the (fractional) pair index that turns `rotations` times
        original = scaling.original_max_position_embeddings
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dimension(scaling.beta_fast), dimension(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero, as transformers does
    ramp = ((torch.arange(head_dim // 2, dtype=dtype) - low) / (high - low)).clamp(0, 1)  # 0 below low, 1 above high
    return 1 - ramp


def rope_frequencies(head_dim: int, base: float = 10000.0, scaling: RopeScaling | None = None,
                     dtype: torch.dtype = torch.float32, seq_len: int | None = None) -> torch.Tensor:
    """The (D/2,) rotation frequencies theta_i = base^(-2i/D), rescaled by ``scaling``, computed in ``dtype``.

    ``seq_len`` (the current length) matters only for "dynamic". The operations follow transformers'
    ``ROPE_INIT_FUNCTIONS`` step by step, so that float32 results agree bit for bit.
    """
    if scaling is not None and scaling.rope_type in ("ntk", "dynamic"):
        if scaling.rope_type == "ntk":
            alpha = scaling.factor
        else:
            original = scaling.original_max_position_embeddings
            length = original if seq_len is None else max(seq_len, original)
            alpha = (scaling.factor * length / original) - (scaling.factor - 1)
        base = base * alpha ** (head_dim / (head_dim - 2))  # NTK-aware: the lowest frequency is divided by alpha
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim))  # (D/2,)
    if scaling is None or scaling.rope_type in ("ntk", "dynamic"):
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor  # the same as dividing the positions by factor
    if scaling.rope_type == "yarn":
        keep = _yarn_ramp(scaling, head_dim, base, dtype)  # (D/2,) 1: extrapolate, 0: interpolate
        pos_freqs = base ** (torch.arange(0, head_dim, 2, dtype=dtype) / head_dim)
        return 1.0 / (scaling.factor * pos_freqs) * (1 - keep) + 1.0 / pos_freqs * keep  # (D/2,)
    original, low, high = scaling.original_max_position_embeddings, scaling.low_freq_factor, scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq  # (D/2,) positions per full turn
    smooth = (original / wavelen - low) / (high - low)  # 0 at wavelength original/low, 1 at original/high
    mixed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / scaling.factor, mixed)
    return torch.where(wavelen < original / high, inv_freq, scaled)  # (D/2,)


class RotaryEmbedding(nn.Module):
    """RoPE: rotate each pair (x_i, x_{i+D/2}) of a query/key by the angle p * theta_i, theta_i = base^(-2i/D).

    Then <RoPE(q, m), RoPE(k, n)> depends on the positions only through m - n. ``scaling`` rescales the theta_i
    (see `RopeScaling`); "dynamic" recomputes them from the largest position seen in each call, and "yarn" also
    multiplies cos/sin by its attention factor. Angles are computed in float32 for float32/bf16/fp16 input and in
    float64 for float64 input. forward(x, positions): x (B, H, T, D), positions (T,) or (B, T) -> rotated x.
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
        dynamic = self.scaling is not None and self.scaling.rope_type == "dynamic"
        seq_len = int(positions.max()) + 1 if dynamic and positions.numel() else None
        if dtype == torch.float64:  # frequencies recomputed in float64 (the buffer holds float32 values)
            inv_freq = rope_frequencies(self.head_dim, self.base, self.scaling, torch.float64, seq_len)
            angle = positions.to(torch.float64)[..., None] * inv_freq.to(positions.device)  # (..., T, D/2)
        else:
            inv_freq = self.inv_freq
            if seq_len is not None and seq_len > self.scaling.original_max_position_embeddings:
                inv_freq = rope_frequencies(self.head_dim, self.base, self.scaling, seq_len=seq_len).to(inv_freq.device)
            angle = positions.to(torch.float32)[..., None] * inv_freq  # (..., T, D/2)
        angle = torch.cat([angle, angle], dim=-1)  # (..., T, D)
        if self.scaling is not None and self.scaling.attention_scaling != 1.0:  # YaRN's temperature
            return angle.cos() * self.scaling.attention_scaling, angle.sin() * self.scaling.attention_scaling
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
