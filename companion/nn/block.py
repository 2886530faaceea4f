"""A configurable Transformer block: self-attention, optional cross-attention and a feed-forward network, each in a
residual branch, with the norm before the branch (pre-norm, GPT-2/LLaMA; Xiong et al., 2020) or after the sum
(post-norm, the original Transformer and BERT). One `BlockConfig` covers encoder blocks (bidirectional), decoder
blocks (causal) and encoder-decoder decoder blocks (causal + cross-attention); later chapters stack these.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from companion.nn.attention import AttentionConfig, Backend, KVCacheLike, MultiHeadAttention
from companion.nn.layers import FeedForward, FFNKind, NormKind, make_norm, swiglu_hidden
from companion.nn.positional import RopeScaling


@dataclass(frozen=True)
class BlockConfig:
    """Everything that distinguishes the blocks of BERT, GPT-2, LLaMA and T5-style decoders."""

    d_model: int  # C, residual stream width
    n_heads: int  # H, query heads
    n_kv_heads: int | None = None  # G, key/value heads (None = H; 1 = multi-query; else grouped-query)
    d_ff: int | None = None  # FFN hidden width (None: 4C, or LLaMA's 2/3 * 4C rounded for SwiGLU)
    norm: NormKind = "layer"  # "layer" (LayerNorm) or "rms" (RMSNorm)
    norm_eps: float = 1e-5  # epsilon inside the norms
    ffn: FFNKind = "gelu"  # "gelu", "gelu_tanh" (GPT-2), "relu" or "swiglu"
    pre_norm: bool = True  # True: x + f(norm(x)); False: norm(x + f(x))
    causal: bool = True  # mask future positions in self-attention
    cross_attention: bool = False  # add a cross-attention branch over an encoder's output
    kv_dim: int | None = None  # width of the cross-attention context (None = d_model)
    positional: Literal["none", "rope", "alibi"] = "none"  # position info applied inside self-attention
    rope_base: float = 10000.0  # RoPE theta
    rope_scaling: RopeScaling | None = None  # RoPE frequency rescaling for long contexts (None: plain RoPE)
    dropout: float = 0.0  # dropout on attention weights and on each branch output (training only)
    bias: bool = True  # biases in linear layers and LayerNorm
    backend: Backend = "torch"  # attention kernel: "torch" (SDPA) or "math" (the formula)
    attn_scale: float | None = None  # score scale (None: 1/sqrt(D); T5 uses 1.0)
    qk_norm: bool = False  # RMSNorm on each head's queries and keys in self-attention (OLMo 2, Gemma 3, Qwen3)
    window: int | None = None  # self-attention sliding window in keys (None: full causal attention)

    def __post_init__(self) -> None:
        self.attention()  # validates widths, heads, positional, RoPE scaling, dropout
        if self.norm not in ("layer", "rms"):
            raise ValueError(f"norm must be 'layer' or 'rms', got {self.norm!r}")
        if self.ffn not in ("gelu", "gelu_tanh", "relu", "swiglu"):
            raise ValueError(f"ffn must be 'gelu', 'gelu_tanh', 'relu' or 'swiglu', got {self.ffn!r}")
        if self.d_ff is not None and self.d_ff < 1:
            raise ValueError(f"d_ff must be positive, got {self.d_ff!r}")

    @property
    def ffn_hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return swiglu_hidden(self.d_model) if self.ffn == "swiglu" else 4 * self.d_model

    def attention(self, cross: bool = False) -> AttentionConfig:
        """The self-attention (or, with ``cross``, the cross-attention) configuration of this block."""
        return AttentionConfig(
            d_model=self.d_model,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            kv_dim=self.kv_dim if cross else None,
            causal=self.causal and not cross,
            bias=self.bias,
            dropout=self.dropout,
            positional="none" if cross else self.positional,
            rope_base=self.rope_base,
            rope_scaling=None if cross else self.rope_scaling,
            backend=self.backend,
            scale=self.attn_scale,
            qk_norm=self.qk_norm and not cross,
            window=None if cross else self.window,
        )

    @classmethod
    def gpt2(cls, d_model: int = 768, n_heads: int = 12, **overrides: Any) -> BlockConfig:
        """GPT-2: pre-norm LayerNorm, GELU FFN, causal, biases (learned positions are added outside)."""
        return replace(cls(d_model=d_model, n_heads=n_heads), **overrides)

    @classmethod
    def llama(
        cls, d_model: int = 4096, n_heads: int = 32, n_kv_heads: int | None = None, **overrides: Any
    ) -> BlockConfig:
        """LLaMA: pre-norm RMSNorm, SwiGLU, RoPE, no biases, optional grouped-query attention."""
        base = cls(d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, norm="rms", norm_eps=1e-6,
                   ffn="swiglu", positional="rope", bias=False)
        return replace(base, **overrides)

    @classmethod
    def bert(cls, d_model: int = 768, n_heads: int = 12, **overrides: Any) -> BlockConfig:
        """BERT: post-norm LayerNorm (eps 1e-12), GELU FFN, bidirectional."""
        base = cls(d_model=d_model, n_heads=n_heads, norm_eps=1e-12, pre_norm=False, causal=False)
        return replace(base, **overrides)


class TransformerBlock(nn.Module):
    """forward(x, mask, context, context_mask, positions, kv_cache) -> (B, T, C).

    x: (B, T, C); mask broadcasts to (B, H, T, T) (self-attention, combined with the causal mask);
    context: (B, S, kv_dim) and context_mask broadcasting to (B, H, T, S) for cross-attention.
    """

    def __init__(self, config: BlockConfig, ffn: nn.Module | None = None) -> None:
        super().__init__()  # ffn: a module to use as the feed-forward branch (e.g. `companion.nn.moe.MoE`)
        self.config = config
        c = config.d_model
        self.norm1 = make_norm(config.norm, c, eps=config.norm_eps, bias=config.bias)
        self.self_attn = MultiHeadAttention(config.attention())
        if config.cross_attention:
            self.norm_cross = make_norm(config.norm, c, eps=config.norm_eps, bias=config.bias)
            self.cross_attn = MultiHeadAttention(config.attention(cross=True))
        self.norm2 = make_norm(config.norm, c, eps=config.norm_eps, bias=config.bias)
        self.ffn = ffn if ffn is not None else FeedForward(c, config.ffn_hidden, kind=config.ffn, bias=config.bias,
                                                           dropout=config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def _residual(
        self, x: torch.Tensor, norm: nn.Module, branch: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        if self.config.pre_norm:
            return x + branch(norm(x))  # (B, T, C)
        return norm(x + branch(x))  # (B, T, C)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        kv_cache: KVCacheLike | None = None,
    ) -> torch.Tensor:
        if self.config.cross_attention and context is None:
            raise ValueError("this block has cross-attention: pass the encoder output as context")
        if not self.config.cross_attention and context is not None:
            raise ValueError("context given but the block was built with cross_attention=False")

        def self_branch(h: torch.Tensor) -> torch.Tensor:
            return self.dropout(self.self_attn(h, mask=mask, positions=positions, kv_cache=kv_cache)[0])

        x = self._residual(x, self.norm1, self_branch)
        if self.config.cross_attention:
            def cross_branch(h: torch.Tensor) -> torch.Tensor:
                return self.dropout(self.cross_attn(h, context, mask=context_mask)[0])

            x = self._residual(x, self.norm_cross, cross_branch)
        return self._residual(x, self.norm2, self.ffn)  # FeedForward applies its own output dropout
