"""Scaled dot-product and multi-head attention, written from the formula softmax(QK^T / sqrt(d_k)) V.

Vaswani et al. (2017), "Attention Is All You Need"; grouped-query attention from Ainslie et al. (2023), multi-query
attention from Shazeer (2019). Masks follow PyTorch's convention: a boolean mask is True where attention is
*allowed*, a float mask is *added* to the scores. The math path is the reference; `backend="torch"` dispatches to
`F.scaled_dot_product_attention` (flash / memory-efficient kernels) after the same validation. Options, all off by
default: QK-norm (RMSNorm of each head's queries and keys before RoPE: Dehghani et al., 2023; OLMo 2, Gemma 3, Qwen3)
and a causal sliding window (Beltagy et al., 2020; Mistral 7B; Gemma 2/3's local layers), with the window counted
as in transformers (W keys, the query's own position included). `kv_cache_bytes_per_token` sizes the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections.abc import Sequence
from typing import Literal, Protocol

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from companion.nn.layers import RMSNorm
from companion.nn.positional import RopeScaling, RotaryEmbedding, alibi_bias

Backend = Literal["math", "torch"]


def causal_mask(t: int, s: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (T, S) mask, True where query i may attend key j.

    Aligned to the bottom right: with S >= T keys (e.g. a KV cache holding S - T earlier tokens) query i sits at
    absolute position S - T + i and sees keys 0..S - T + i. For S == T this is the usual lower triangle.
    """
    s = t if s is None else s
    if t < 1 or s < t:
        raise ValueError(f"causal mask needs 1 <= T <= S, got T={t!r}, S={s!r}")
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)  # (T, S)


def sliding_window_mask(t: int, s: int | None = None, *, window: int,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """Boolean (T, S) causal mask limited to the last ``window`` keys: query i (at absolute position S - T + i, as in
    `causal_mask`) sees key j iff 0 <= (S - T + i) - j < window, its own position included (transformers' rule)."""
    s = t if s is None else s
    if t < 1 or s < t:
        raise ValueError(f"sliding window mask needs 1 <= T <= S, got T={t!r}, S={s!r}")
    if window < 1:
        raise ValueError(f"window must be a positive number of keys, got {window!r}")
    query = torch.arange(s - t, s, device=device)[:, None]  # (T, 1) absolute positions
    key = torch.arange(s, device=device)[None, :]  # (1, S)
    return (key <= query) & (query - key < window)  # (T, S)


def padding_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Turn a (B, S) 0/1 or bool "which tokens are real" mask into a boolean (B, 1, 1, S) key mask."""
    if attention_mask.dim() != 2:
        raise ValueError(f"padding mask must have shape (B, S), got shape {tuple(attention_mask.shape)}")
    return rearrange(attention_mask.bool(), "b s -> b 1 1 s")


def merge_masks(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    """Combine two masks: AND for two boolean masks, otherwise the sum of their additive forms."""
    if a is None or b is None:
        return a if b is None else b
    if a.dtype == torch.bool and b.dtype == torch.bool:
        return a & b
    return to_additive(a) + to_additive(b)


def to_additive(mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A boolean mask becomes 0 where allowed and -inf where not; a float mask is returned unchanged."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _check_mask(mask: torch.Tensor, target: tuple[int, ...]) -> None:
    """Raise unless ``mask`` broadcasts to ``target`` = (B, H, T, S)."""
    shape = tuple(mask.shape)
    ok = len(shape) <= len(target) and all(m in (1, t) for m, t in zip(reversed(shape), reversed(target)))
    if not ok:
        raise ValueError(f"mask of shape {shape} does not broadcast to the scores' shape (B, H, T, S) = {target}")


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int, int]:
    """Validate q (B, H, T, D), k (B, G, S, D), v (B, G, S, Dv) with G dividing H; return (B, H, T, D, G, S)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        shapes = f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        raise ValueError(f"q, k, v must be 4-D (B, H, T, D), got shapes {shapes}")
    b, h, t, d = q.shape
    g, s = k.shape[1], k.shape[2]
    if k.shape[0] != b or v.shape[0] != b or v.shape[1] != g or v.shape[2] != s or k.shape[3] != d:
        raise ValueError(f"incompatible q, k, v shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if h % g != 0:
        raise ValueError(f"number of query heads must be a multiple of key/value heads, got H={h} and G={g}")
    return b, h, t, d, g, s


def scaled_dot_product_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    return_weights: bool = False,
    backend: Backend = "math",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """softmax(Q K^T * scale + mask) V with scale = 1/sqrt(D) by default.

    q: (B, H, T, D); k: (B, G, S, D); v: (B, G, S, Dv) with G dividing H (G < H is grouped-query attention: query
    head h uses key/value head h // (H // G)). ``mask`` broadcasts to (B, H, T, S): bool (True = attend) or float
    (added to the scores). ``is_causal`` adds a bottom-right aligned causal mask (see `causal_mask`). Dropout is
    applied to the attention weights whenever ``dropout_p > 0`` (the caller passes 0 in eval mode). Rows whose keys
    are all masked give zero output, as in PyTorch. Returns (B, H, T, Dv), and the (B, H, T, S) weights if asked
    (math backend only).
    """
    b, h, t, d, g, s = check_qkv(q, k, v)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if backend not in ("math", "torch"):
        raise ValueError(f"backend must be 'math' or 'torch', got {backend!r}")
    if return_weights and backend != "math":
        raise ValueError("attention weights are only available from backend='math'")
    if mask is not None:
        _check_mask(mask, (b, h, t, s))
    if is_causal and t == 1:  # one query, at the last position: the causal mask allows every key (a decoding step)
        is_causal = False
    if is_causal:
        if t != s or mask is not None:  # torch's is_causal is top-left aligned and excludes attn_mask: build it
            mask = merge_masks(mask, causal_mask(t, s, device=q.device))
            is_causal = False
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    if backend == "torch":
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(q.dtype)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=g != h
        )

    if g != h:  # each key/value head serves H // G query heads
        k = repeat(k, "b g s d -> b (g r) s d", r=h // g)  # (B, H, S, D)
        v = repeat(v, "b g s d -> b (g r) s d", r=h // g)  # (B, H, S, Dv)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, S)
    blocked = None  # (..., T, 1): rows with no key to attend to (never the case for a plain causal mask)
    if is_causal:
        scores = scores.masked_fill(~causal_mask(t, s, device=q.device), float("-inf"))
    elif mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
            blocked = ~mask.any(dim=-1, keepdim=True)
        else:
            scores = scores + mask
            blocked = torch.isneginf(mask).all(dim=-1, keepdim=True)
            if bool(blocked.any()):  # a finite row for softmax: its output is zeroed below, and no NaN flows back
                scores = scores.masked_fill(blocked, 0.0)
    weights = torch.softmax(scores, dim=-1)  # (B, H, T, S)
    if blocked is not None and bool(blocked.any()):
        weights = weights.masked_fill(blocked, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    out = weights @ v  # (B, H, T, Dv)
    return (out, weights) if return_weights else out


class KVCacheLike(Protocol):
    """What attention needs from a key/value cache (one layer). Generation (chapter 10) supplies richer ones."""

    @property
    def seq_len(self) -> int:
        """Number of positions already stored."""
        ...

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v of shape (B, G, T, D) and return all keys and values, (B, G, S, D) with S = seq_len + T."""
        ...


class KVCache:
    """The simplest `KVCacheLike`: concatenates along the time axis. One instance per attention layer."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None  # (B, G, S, D)
        self.v: torch.Tensor | None = None  # (B, G, S, D)

    @property
    def seq_len(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or self.v is None:
            self.k, self.v = k, v
        else:
            self.k = torch.cat([self.k, k], dim=2)
            self.v = torch.cat([self.v, v], dim=2)
        return self.k, self.v


@dataclass(frozen=True)
class AttentionConfig:
    """Shape and options of one multi-head attention layer."""

    d_model: int  # C, width of the input and output
    n_heads: int  # H, query heads
    n_kv_heads: int | None = None  # G, key/value heads (None = H: multi-head; 1: multi-query; else grouped-query)
    kv_dim: int | None = None  # width of the context for cross-attention (None = d_model)
    causal: bool = False  # mask future positions
    bias: bool = True  # biases in the q/k/v/out projections
    dropout: float = 0.0  # dropout on the attention weights (training only)
    positional: Literal["none", "rope", "alibi"] = "none"  # position information applied inside attention
    rope_base: float = 10000.0  # RoPE frequency base theta
    rope_scaling: RopeScaling | None = None  # RoPE frequency rescaling for long contexts (None: plain RoPE)
    backend: Backend = "torch"  # "torch": F.scaled_dot_product_attention; "math": the formula
    scale: float | None = None  # multiplies Q K^T (None: 1/sqrt(D); T5 uses 1.0, its init absorbs the factor)
    qk_norm: bool = False  # RMSNorm (one weight of size D, shared by the heads) on queries and keys, before RoPE
    qk_norm_eps: float = 1e-6  # epsilon of the QK-norm
    window: int | None = None  # sliding window: each query sees its last `window` keys (None: all; needs causal)

    def __post_init__(self) -> None:
        if self.d_model < 1 or self.n_heads < 1:
            raise ValueError(
                f"d_model and n_heads must be positive, got d_model={self.d_model!r}, n_heads={self.n_heads!r}"
            )
        if self.d_model % self.n_heads != 0:
            raise ValueError(
                f"d_model must be divisible by n_heads, got d_model={self.d_model} and n_heads={self.n_heads}"
            )
        g = self.kv_heads
        if g < 1 or self.n_heads % g != 0:
            raise ValueError(f"n_kv_heads must divide n_heads, got n_heads={self.n_heads} and n_kv_heads={g}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.positional not in ("none", "rope", "alibi"):
            raise ValueError(f"positional must be 'none', 'rope' or 'alibi', got {self.positional!r}")
        if self.positional == "rope" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head dim, got {self.head_dim}")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        if self.rope_scaling is not None and self.positional != "rope":
            raise ValueError(f"rope_scaling needs positional='rope', got positional={self.positional!r}")
        if self.backend not in ("math", "torch"):
            raise ValueError(f"backend must be 'math' or 'torch', got {self.backend!r}")
        if self.scale is not None and not self.scale > 0:
            raise ValueError(f"scale must be positive (or None for 1/sqrt(D)), got {self.scale!r}")
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"window must be a positive int (or None), got {self.window!r}")
        if self.window is not None and not self.causal:
            raise ValueError(f"a sliding window needs causal=True, got causal={self.causal!r} with window={self.window}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads  # D

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads  # G

    def kv_cache_elements(self, n_tokens: int) -> int:
        """Numbers this layer caches for one sequence of ``n_tokens``: keys and values of G heads of width D, for at
        most ``window`` positions (a rolling buffer, as in Mistral 7B, drops the keys the window no longer sees)."""
        kept = n_tokens if self.window is None else min(n_tokens, self.window)
        return 2 * self.kv_heads * self.head_dim * kept


class CachesKV(Protocol):
    """A layer configuration that knows its cache size (`AttentionConfig`, `companion.nn.mla.MLAConfig`)."""

    def kv_cache_elements(self, n_tokens: int) -> int: ...


def kv_cache_bytes_per_token(layers: CachesKV | Sequence[CachesKV], dtype: torch.dtype = torch.bfloat16,
                             context: int | None = None) -> float:
    """Bytes of KV cache per token of one sequence, summed over ``layers`` (one config per layer, or one layer).

    Without ``context`` every cached position costs its full size (windows do not bind yet). With ``context`` = L
    it is the cache of an L-token sequence divided by L, so a window W < L layer contributes only W / L of its size.
    """
    configs = [layers] if not isinstance(layers, Sequence) else list(layers)
    if not configs:
        raise ValueError("need at least one layer configuration")
    if context is not None and context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    n = 1 if context is None else context
    elements = sum(layer.kv_cache_elements(n) for layer in configs)
    return elements * torch.empty((), dtype=dtype).element_size() / n


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with H query heads and G key/value heads.

    forward(x, context=None, ...) returns (out, weights): out (B, T, C); weights (B, H, T, S) when
    ``need_weights`` (then the math path runs), else None. With ``kv_cache`` (self-attention only) the new keys and
    values are appended and the queries attend to everything cached; RoPE/ALiBi positions start at the cache length.
    """

    def __init__(self, config: AttentionConfig) -> None:
        super().__init__()
        self.config = config
        c, d, h, g = config.d_model, config.head_dim, config.n_heads, config.kv_heads
        kv_dim = config.kv_dim or c
        self.q_proj = nn.Linear(c, h * d, bias=config.bias)
        self.k_proj = nn.Linear(kv_dim, g * d, bias=config.bias)
        self.v_proj = nn.Linear(kv_dim, g * d, bias=config.bias)
        self.out_proj = nn.Linear(h * d, c, bias=config.bias)
        rope = config.positional == "rope"
        self.rope = RotaryEmbedding(d, config.rope_base, scaling=config.rope_scaling) if rope else None
        if config.qk_norm:
            self.q_norm = RMSNorm(d, eps=config.qk_norm_eps)
            self.k_norm = RMSNorm(d, eps=config.qk_norm_eps)
        # one (H + 2G)D x C projection computing q, k and v together (self-attention); None: the three above.
        # Set for decoding by `companion.inference.optimize.fuse_qkv`, whose weight the three share.
        self.fused_qkv: nn.Module | None = None

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
        need_weights: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: (B, T, C); context: (B, S, kv_dim) for cross-attention; mask broadcasts to (B, H, T, S) (bool: True =
        attend, float: added); positions: (T,) or (B, T) absolute positions for RoPE/ALiBi (default: from the cache
        length on)."""
        cfg = self.config
        if x.dim() != 3 or x.shape[-1] != cfg.d_model:
            raise ValueError(f"x must have shape (B, T, {cfg.d_model}), got {tuple(x.shape)}")
        if context is not None and kv_cache is not None:
            raise ValueError("kv_cache is for self-attention; cache projected context keys outside this layer")
        source = x if context is None else context
        b, t, n, d = x.shape[0], x.shape[1], source.shape[1], cfg.head_dim
        # heads split with view + transpose: rearrange "b t (h d) -> b h t d" at a third of its cost per decoding step
        if self.fused_qkv is not None and context is None:
            qkv = self.fused_qkv(x).view(b, t, cfg.n_heads + 2 * cfg.kv_heads, d).transpose(1, 2)  # (B, H+2G, T, D)
            q, k, v = qkv.split((cfg.n_heads, cfg.kv_heads, cfg.kv_heads), dim=1)  # (B, H, T, D), 2 x (B, G, T, D)
        else:
            q = self.q_proj(x).view(b, t, cfg.n_heads, d).transpose(1, 2)  # (B, H, T, D)
            k = self.k_proj(source).view(b, n, cfg.kv_heads, d).transpose(1, 2)  # (B, G, S, D)
            v = self.v_proj(source).view(b, n, cfg.kv_heads, d).transpose(1, 2)  # (B, G, S, D)
        if cfg.qk_norm:  # each head's query and key vectors get unit RMS (times a learned gain), before RoPE
            q, k = self.q_norm(q), self.k_norm(k)

        offset = 0 if kv_cache is None else kv_cache.seq_len
        if positions is None and cfg.positional != "none":
            positions = torch.arange(offset, offset + x.shape[1], device=x.device)  # (T,)
        if self.rope is not None and context is None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        if kv_cache is not None:
            k, v = kv_cache.update(k, v)  # (B, G, S, D) with S = offset + T
        s = k.shape[2]
        if cfg.positional == "alibi" and context is None:
            key_pos = torch.arange(s, device=x.device)
            mask = merge_masks(mask, alibi_bias(cfg.n_heads, positions, key_pos, device=x.device))
        causal = cfg.causal and context is None
        if cfg.window is not None and context is None:  # the window mask is causal itself
            mask = merge_masks(mask, sliding_window_mask(x.shape[1], s, window=cfg.window, device=x.device))
            causal = False
        backend: Backend = "math" if need_weights else cfg.backend
        p = cfg.dropout if self.training else 0.0
        result = scaled_dot_product_attention(
            q, k, v, mask, is_causal=causal, dropout_p=p, scale=cfg.scale, return_weights=need_weights,
            backend=backend,
        )
        out, weights = result if need_weights else (result, None)
        out = out.transpose(1, 2).reshape(b, t, cfg.n_heads * out.shape[-1])  # (B, T, C)
        return self.out_proj(out), weights
