"""Multi-head latent attention (MLA) of DeepSeek-V2 (DeepSeek-AI, 2024), also used by DeepSeek-V3.

The keys and values of all heads are rebuilt from one shared latent c_KV = RMSNorm(W_DKV x) of width d_c, so a KV
cache holds d_c numbers per token and layer, plus one shared RoPE key of width d_R, instead of 2 H D. RoPE cannot act
on the latent (a position-dependent rotation between W_UK and the query would stop W_UK from being folded into the
query), so position travels in a separate "decoupled" part: d_R more dimensions in every query head and one d_R key
shared by all heads. ``absorb=True`` computes the same attention in the latent space: W_UK folded into the queries,
W_UV applied after the weighted sum, which makes MLA a multi-query attention whose single key/value head *is* the
cache. Weight layout follows transformers' `DeepseekV3Attention` with ``rope_interleave=False`` (rotate-half RoPE).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from companion.nn.attention import Backend, KVCacheLike, scaled_dot_product_attention
from companion.nn.layers import RMSNorm
from companion.nn.positional import RopeScaling, RotaryEmbedding


@dataclass(frozen=True)
class MLAConfig:
    """Shape of one MLA layer (DeepSeek-V2 notation in the comments). Presets: `deepseek_v2`, `deepseek_v3`."""

    d_model: int  # C, width of the input and output
    n_heads: int  # H, attention heads
    kv_rank: int  # d_c, width of the cached key/value latent (DeepSeek-V2/V3: 512)
    q_rank: int | None = None  # d_c', width of the query latent (None: full-rank query projection; V2/V3: 1536)
    head_dim: int = 128  # d_h, per-head width of the position-free query/key part
    rope_dim: int = 64  # d_h^R, decoupled RoPE width: in every query head, and in one key shared by all heads
    v_head_dim: int | None = None  # per-head value width (None: head_dim)
    causal: bool = True  # mask future positions
    rope_base: float = 10000.0  # RoPE theta
    rope_scaling: RopeScaling | None = None  # RoPE frequency rescaling (None: plain RoPE)
    norm_eps: float = 1e-6  # epsilon of the RMSNorms on the latents
    backend: Backend = "torch"  # "torch": F.scaled_dot_product_attention; "math": the formula
    scale: float | None = None  # multiplies Q K^T (None: 1/sqrt(head_dim + rope_dim))

    def __post_init__(self) -> None:
        for name in ("d_model", "n_heads", "kv_rank", "head_dim", "rope_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.q_rank is not None and self.q_rank < 1:
            raise ValueError(f"q_rank must be positive or None, got {self.q_rank!r}")
        if self.v_head_dim is not None and self.v_head_dim < 1:
            raise ValueError(f"v_head_dim must be positive or None, got {self.v_head_dim!r}")
        if self.rope_dim % 2:
            raise ValueError(f"RoPE needs an even rope_dim, got {self.rope_dim}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        if self.backend not in ("math", "torch"):
            raise ValueError(f"backend must be 'math' or 'torch', got {self.backend!r}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be positive (or None), got {self.scale!r}")

    @property
    def value_dim(self) -> int:
        return self.head_dim if self.v_head_dim is None else self.v_head_dim

    def kv_cache_elements(self, n_tokens: int) -> int:
        """Numbers cached for one sequence of ``n_tokens``: the latent and the shared RoPE key, (d_c + d_R) each."""
        return (self.kv_rank + self.rope_dim) * n_tokens

    @classmethod
    def deepseek_v2(cls) -> MLAConfig:
        """DeepSeek-V2 (236B total, 60 layers): d_c = 4 d_h = 512, d_c' = 1536, d_R = d_h / 2 = 64."""
        return cls(d_model=5120, n_heads=128, kv_rank=512, q_rank=1536, head_dim=128, rope_dim=64, v_head_dim=128)

    @classmethod
    def deepseek_v3(cls) -> MLAConfig:
        """DeepSeek-V3 (671B total, 61 layers): the same ranks as V2 on a 7168-wide model."""
        return cls(d_model=7168, n_heads=128, kv_rank=512, q_rank=1536, head_dim=128, rope_dim=64, v_head_dim=128)


class MultiHeadLatentAttention(nn.Module):
    """MLA self-attention: forward(x, mask=None, positions=None, kv_cache=None, absorb=False) -> (B, T, C).

    ``kv_cache`` (any `KVCacheLike`, e.g. `companion.nn.attention.KVCache`) stores the latent (B, 1, S, d_c) in its
    key slot and the rotated shared RoPE key (B, 1, S, d_R) in its value slot: that is all MLA caches.
    """

    def __init__(self, config: MLAConfig) -> None:
        super().__init__()
        self.config = config
        c, h, dc, dr = config.d_model, config.n_heads, config.kv_rank, config.rope_dim
        dq = h * (config.head_dim + dr)
        if config.q_rank is None:
            self.q_proj = nn.Linear(c, dq, bias=False)
        else:  # queries through their own low-rank bottleneck (saves activation memory in training, not cache)
            self.q_down = nn.Linear(c, config.q_rank, bias=False)  # W_DQ
            self.q_norm = RMSNorm(config.q_rank, eps=config.norm_eps)
            self.q_up = nn.Linear(config.q_rank, dq, bias=False)  # W_UQ and W_QR, per head [d_h | d_R]
        self.kv_down = nn.Linear(c, dc + dr, bias=False)  # W_DKV and W_KR: [latent d_c | shared RoPE key d_R]
        self.kv_norm = RMSNorm(dc, eps=config.norm_eps)
        self.k_up = nn.Linear(dc, h * config.head_dim, bias=False)  # W_UK
        self.v_up = nn.Linear(dc, h * config.value_dim, bias=False)  # W_UV
        self.out_proj = nn.Linear(h * config.value_dim, c, bias=False)  # W_O
        self.rope = RotaryEmbedding(dr, config.rope_base, scaling=config.rope_scaling)

    def latents(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a token contributes to the cache: the normed latent (B, 1, T, d_c) and the rotated key (B, 1, T, d_R)."""
        kv = self.kv_down(x)  # (B, T, d_c + d_R)
        latent, k_rope = kv.split([self.config.kv_rank, self.config.rope_dim], dim=-1)
        latent = self.kv_norm(latent)[:, None]  # (B, 1, T, d_c): one "head", shared by all query heads
        return latent, self.rope(k_rope[:, None], positions)  # (B, 1, T, d_c), (B, 1, T, d_R)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
        absorb: bool = False,
    ) -> torch.Tensor:
        """x: (B, T, C); mask broadcasts to (B, H, T, S) (bool: True = attend, float: added); positions (T,) or
        (B, T) (default: from the cache length on). ``absorb`` selects the latent-space form (same result)."""
        cfg = self.config
        if x.dim() != 3 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"x must have shape (B, T, {cfg.d_model}), got {tuple(x.shape)}")
        h, dh, dr = cfg.n_heads, cfg.head_dim, cfg.rope_dim
        offset = 0 if kv_cache is None else kv_cache.seq_len
        if positions is None:
            positions = torch.arange(offset, offset + x.shape[1], device=x.device)  # (T,)

        q = self.q_proj(x) if cfg.q_rank is None else self.q_up(self.q_norm(self.q_down(x)))  # (B, T, H (d_h + d_R))
        q = rearrange(q, "b t (h e) -> b h t e", h=h)  # (B, H, T, d_h + d_R)
        q_nope, q_rope = q.split([dh, dr], dim=-1)  # (B, H, T, d_h), (B, H, T, d_R)
        q_rope = self.rope(q_rope, positions)
        latent, k_rope = self.latents(x, positions)  # (B, 1, T, d_c), (B, 1, T, d_R)
        if kv_cache is not None:
            latent, k_rope = kv_cache.update(latent, k_rope)  # (B, 1, S, d_c), (B, 1, S, d_R)
        scale = 1.0 / math.sqrt(dh + dr) if cfg.scale is None else cfg.scale

        if absorb:  # scores q_nope . (W_UK c) = (W_UK^T q_nope) . c: queries move into the latent space
            w_uk = rearrange(self.k_up.weight, "(h d) c -> h d c", h=h)  # (H, d_h, d_c)
            q_lat = torch.cat([q_nope @ w_uk, q_rope], dim=-1)  # (B, H, T, d_c + d_R)
            k_lat = torch.cat([latent, k_rope], dim=-1)  # (B, 1, S, d_c + d_R): one key head for all H
            out = scaled_dot_product_attention(q_lat, k_lat, latent, mask, is_causal=cfg.causal, scale=scale,
                                               backend=cfg.backend)  # (B, H, T, d_c): weighted sums of latents
            w_uv = rearrange(self.v_up.weight, "(h d) c -> h c d", h=h)  # (H, d_c, d_v)
            out = out @ w_uv  # (B, H, T, d_v): W_UV after the sum, as W_UV c would have been before it
        else:  # the training form: materialise every head's keys and values from the latents
            k_nope = rearrange(self.k_up(latent[:, 0]), "b s (h d) -> b h s d", h=h)  # (B, H, S, d_h)
            v = rearrange(self.v_up(latent[:, 0]), "b s (h d) -> b h s d", h=h)  # (B, H, S, d_v)
            k = torch.cat([k_nope, k_rope.expand(-1, h, -1, -1)], dim=-1)  # (B, H, S, d_h + d_R)
            out = scaled_dot_product_attention(torch.cat([q_nope, q_rope], dim=-1), k, v, mask, is_causal=cfg.causal,
                                               scale=scale, backend=cfg.backend)  # (B, H, T, d_v)
        return self.out_proj(rearrange(out, "b h t d -> b t (h d)"))  # (B, T, C)
