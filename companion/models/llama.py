"""LLaMA-style decoder-only language model built from `companion.nn` blocks.

Touvron et al. (2023), "LLaMA" and "Llama 2": pre-norm RMSNorm (Zhang & Sennrich, 2019), SwiGLU MLP (Shazeer,
2020), rotary positions inside attention (Su et al., 2021), no biases, an untied output head, and grouped-query
attention (Ainslie et al., 2023) when ``n_kv_heads < n_heads``; Llama 3.1/3.2 stretch RoPE for long contexts
(``rope_scaling``, see `companion.nn.positional.RopeScaling`). Loads from Hugging Face `LlamaForCausalLM`.
Options, off by default: QK-norm (``qk_norm``, as Qwen3/Gemma 3) and sliding-window attention (``sliding_window``),
in every layer (Mistral 7B) or in all but every ``global_every``-th layer (Gemma 3: 5 local : 1 global).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from companion.models.base import CausalLM, init_weights, padded_positions_and_mask, start_position
from companion.nn.attention import Backend, KVCacheLike
from companion.nn.block import BlockConfig, TransformerBlock
from companion.nn.layers import RMSNorm
from companion.nn.positional import RopeScaling


@dataclass(frozen=True)
class LlamaConfig:
    """Shape of a LLaMA-style model. Presets: `tiny`, `llama2_7b`, `llama3_8b`, `llama3_1_8b`."""

    vocab_size: int = 32000  # V, SentencePiece vocabulary of LLaMA 1/2
    n_ctx: int = 4096  # longest sequence the model is used with (RoPE itself has no table)
    n_layers: int = 32  # number of Transformer blocks
    d_model: int = 4096  # C, residual stream width
    n_heads: int = 32  # H, query heads
    n_kv_heads: int | None = None  # G, key/value heads (None = H; fewer = grouped-query attention)
    d_ff: int = 11008  # SwiGLU hidden width (about 2/3 * 4C, rounded up to a multiple of 256)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_base: float = 10000.0  # RoPE theta
    rope_scaling: RopeScaling | None = None  # RoPE frequency rescaling for long contexts (None: plain RoPE)
    tie_embeddings: bool = False  # LLaMA keeps a separate output matrix; small Qwen/Llama-3.2 models tie it
    dropout: float = 0.0  # LLaMA trains without dropout
    backend: Backend = "torch"  # attention kernel
    qk_norm: bool = False  # RMSNorm on each head's queries and keys before RoPE (Qwen3, Gemma 3)
    sliding_window: int | None = None  # local layers see only their last W keys (None: every layer global)
    global_every: int | None = None  # with sliding_window: layers n-1, 2n-1, ... stay global (None: all local)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_ctx", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.global_every is not None and (self.sliding_window is None or self.global_every < 1):
            raise ValueError(f"global_every needs a sliding_window and must be >= 1, got global_every="
                             f"{self.global_every!r} with sliding_window={self.sliding_window!r}")
        self.block()  # validates widths, heads, RoPE head dim and scaling, window

    def window(self, layer: int) -> int | None:
        """The sliding window of block ``layer`` (None: full attention)."""
        if self.sliding_window is None or (self.global_every is not None and (layer + 1) % self.global_every == 0):
            return None
        return self.sliding_window

    def block(self, layer: int = 0) -> BlockConfig:
        return BlockConfig.llama(self.d_model, self.n_heads, self.n_kv_heads, d_ff=self.d_ff, norm_eps=self.norm_eps,
                                 rope_base=self.rope_base, rope_scaling=self.rope_scaling, dropout=self.dropout,
                                 backend=self.backend, qk_norm=self.qk_norm, window=self.window(layer))

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads  # D

    @classmethod
    def tiny(cls) -> LlamaConfig:
        """A CPU-sized model with grouped-query attention (4 query heads share 2 key/value heads)."""
        return cls(vocab_size=256, n_ctx=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=176)

    @classmethod
    def llama2_7b(cls) -> LlamaConfig:
        return cls()  # 6.74B

    @classmethod
    def llama3_8b(cls) -> LlamaConfig:
        return cls(vocab_size=128256, n_ctx=8192, n_kv_heads=8, d_ff=14336, rope_base=500000.0)  # 8.03B

    @classmethod
    def llama3_1_8b(cls) -> LlamaConfig:
        """Llama 3.1 8B: Llama 3's shape, the 8K pretraining context stretched to 128K by the "llama3" RoPE scaling."""
        return cls(vocab_size=128256, n_ctx=131072, n_kv_heads=8, d_ff=14336, rope_base=500000.0,
                   rope_scaling=RopeScaling.llama3())  # 8.03B


class Llama(CausalLM):
    """forward(idx (B, T), attention_mask=None, kv_caches=None) -> logits (B, T, V); with ``labels=`` the loss.

    ``attention_mask`` (B, S), S = cached + new positions, marks real tokens with 1 and padding with 0 (see
    `companion.models.base.padded_positions_and_mask`): RoPE then counts positions from each row's first real token.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(TransformerBlock(config.block(i)) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(init_weights)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 kv_caches: Sequence[KVCacheLike] | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C): ``forward`` without the LM head (for classifiers and pooled features)."""
        offset = start_position(idx, kv_caches, self.config.n_ctx)
        mask, positions = None, None  # None: RoPE reads the offset from the cache
        if attention_mask is not None:
            positions, mask = padded_positions_and_mask(idx, attention_mask, offset)  # (B, T), (B, 1, T, S)
        x = self.tok_emb(idx)  # (B, T, C); no position table: RoPE rotates q and k inside each block
        padding = {} if mask is None else {"mask": mask, "positions": positions}  # absent: the plain causal path
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=None if kv_caches is None else kv_caches[i], **padding)  # (B, T, C)
        return self.norm(x)  # (B, T, C)
