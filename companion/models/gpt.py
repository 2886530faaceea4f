"""GPT-2 style decoder-only language model built from `companion.nn` blocks.

Radford et al. (2019), "Language Models are Unsupervised Multitask Learners": learned absolute positions, pre-norm
LayerNorm blocks, a GELU (tanh approximation) MLP of width 4C, a final LayerNorm and an output head tied to the token
embedding. Layout follows nanoGPT; weights load from Hugging Face `GPT2LMHeadModel` through `companion.models.hf`.
With ``moe`` set, every block's MLP is a mixture of SwiGLU experts (`companion.nn.moe.MoE`; not a GPT-2 checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from companion.models.base import CausalLM, init_weights, padded_positions_and_mask, start_position
from companion.nn.attention import Backend, KVCacheLike
from companion.nn.block import BlockConfig, TransformerBlock
from companion.nn.layers import FFNKind, LayerNorm
from companion.nn.moe import MoE, MoEConfig
from companion.nn.positional import LearnedPositionalEmbedding


@dataclass(frozen=True)
class GPTConfig:
    """Shape of a GPT-2 style model. Presets: `tiny`, `gpt2_small` (124M), `gpt2_medium` (355M), `gpt2_large`,
    `gpt2_xl`."""

    vocab_size: int = 50257  # V, GPT-2's byte-level BPE vocabulary
    n_ctx: int = 1024  # context length (rows of the learned position table)
    n_layers: int = 12  # number of Transformer blocks
    d_model: int = 768  # C, residual stream width
    n_heads: int = 12  # H, attention heads
    d_ff: int | None = None  # MLP hidden width (None: 4C)
    ffn: FFNKind = "gelu_tanh"  # GPT-2 uses the tanh approximation of GELU ("gelu_new" in transformers)
    norm_eps: float = 1e-5  # LayerNorm epsilon
    dropout: float = 0.0  # embedding, attention and residual dropout (GPT-2 trained with 0.1)
    tie_embeddings: bool = True  # output head shares the token embedding matrix
    backend: Backend = "torch"  # attention kernel
    moe: MoEConfig | None = None  # mixture-of-experts FFN in every block instead of the dense MLP (None: dense)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_ctx", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        self.block()  # validates d_model, n_heads, d_ff, ffn, dropout
        if self.moe is not None and not isinstance(self.moe, MoEConfig):
            raise TypeError(f"moe must be a MoEConfig or None, got {type(self.moe).__name__}")

    def block(self) -> BlockConfig:
        return BlockConfig.gpt2(self.d_model, self.n_heads, d_ff=self.d_ff, ffn=self.ffn, norm_eps=self.norm_eps,
                                dropout=self.dropout, backend=self.backend)

    @classmethod
    def tiny(cls) -> GPTConfig:
        """A CPU-sized model for tests and notebooks."""
        return cls(vocab_size=256, n_ctx=64, n_layers=2, d_model=64, n_heads=4)

    @classmethod
    def gpt2_small(cls) -> GPTConfig:
        return cls()  # 124M

    @classmethod
    def gpt2_medium(cls) -> GPTConfig:
        return cls(n_layers=24, d_model=1024, n_heads=16)  # 355M

    @classmethod
    def gpt2_large(cls) -> GPTConfig:
        return cls(n_layers=36, d_model=1280, n_heads=20)  # 774M

    @classmethod
    def gpt2_xl(cls) -> GPTConfig:
        return cls(n_layers=48, d_model=1600, n_heads=25)  # 1558M


class GPT(CausalLM):
    """forward(idx (B, T), attention_mask=None, kv_caches=None) -> logits (B, T, V); with ``labels=`` the loss.

    ``attention_mask`` (B, S), S = cached + new positions, marks real tokens with 1 and padding with 0 (see
    `companion.models.base.padded_positions_and_mask`); a left-padded row then gives the logits of the row alone.
    """

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = LearnedPositionalEmbedding(config.d_model, config.n_ctx)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config.block(), ffn=self._moe()) for _ in range(config.n_layers))
        self.norm = LayerNorm(config.d_model, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(init_weights)
        nn.init.normal_(self.pos_emb.weight, std=0.01)  # GPT-2's initialiser for the position table
        for block in self.blocks:  # GPT-2: residual projections scaled by 1/sqrt(2 * n_layers)
            ffns = [block.ffn] if config.moe is None else [*block.ffn.experts, *block.ffn.shared]
            for linear in (block.self_attn.out_proj, *(f.down for f in ffns)):
                nn.init.normal_(linear.weight, std=0.02 / (2 * config.n_layers) ** 0.5)
        if config.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def _moe(self) -> MoE | None:
        return None if self.config.moe is None else MoE(self.config.d_model, self.config.moe)

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 kv_caches: Sequence[KVCacheLike] | None = None) -> torch.Tensor:
        """Final hidden states (B, T, C), after the last norm and before the LM head (for classifiers)."""
        offset = start_position(idx, kv_caches, self.config.n_ctx)
        if attention_mask is None:
            mask, positions = None, None
            x = self.pos_emb(self.tok_emb(idx), offset=offset)  # (B, T, C)
        else:
            positions, mask = padded_positions_and_mask(idx, attention_mask, offset)  # (B, T), (B, 1, T, S)
            x = self.tok_emb(idx) + self.pos_emb.weight[positions]  # (B, T, C)
        x = self.drop(x)
        padding = {} if mask is None else {"mask": mask}  # (B, 1, T, S); absent: the plain causal path
        for i, block in enumerate(self.blocks):
            x = block(x, kv_cache=None if kv_caches is None else kv_caches[i], **padding)  # (B, T, C)
        return self.norm(x)  # (B, T, C)
