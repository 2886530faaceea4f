"""BERT: a bidirectional Transformer encoder with masked-LM and next-sentence heads, built from `companion.nn`.

Devlin et al. (2019), "BERT: Pre-training of Deep Bidirectional Transformers": token + learned position + segment
embeddings followed by LayerNorm, post-norm blocks (LayerNorm after each residual sum, eps 1e-12), exact GELU, a
tanh pooler over the [CLS] position, an MLM head tied to the token embedding and a two-way NSP classifier.
Sentence embeddings (Reimers & Gurevych, 2019) are the mean of the hidden states over real tokens (`mean_pool`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from companion.models.base import check_length, init_weights
from companion.nn.attention import Backend, padding_mask
from companion.nn.block import BlockConfig, TransformerBlock
from companion.nn.layers import LayerNorm


@dataclass(frozen=True)
class BertConfig:
    """Shape of a BERT encoder. Presets: `tiny`, `base` (110M), `large` (340M), `minilm_l6` (all-MiniLM-L6-v2)."""

    vocab_size: int = 30522  # V, uncased WordPiece vocabulary
    n_ctx: int = 512  # rows of the learned position table
    n_layers: int = 12  # number of Transformer blocks
    d_model: int = 768  # C, hidden width
    n_heads: int = 12  # H, attention heads
    d_ff: int = 3072  # FFN hidden width (4C)
    type_vocab_size: int = 2  # segment ids: sentence A / sentence B
    norm_eps: float = 1e-12  # LayerNorm epsilon
    dropout: float = 0.1  # embedding, attention and residual dropout (training only)
    backend: Backend = "torch"  # attention kernel

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_ctx", "n_layers", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        self.block()

    def block(self) -> BlockConfig:
        return BlockConfig.bert(self.d_model, self.n_heads, d_ff=self.d_ff, norm_eps=self.norm_eps,
                                dropout=self.dropout, backend=self.backend)

    @classmethod
    def tiny(cls) -> BertConfig:
        return cls(vocab_size=256, n_ctx=64, n_layers=2, d_model=64, n_heads=4, d_ff=256, dropout=0.0)

    @classmethod
    def base(cls) -> BertConfig:
        return cls()  # 110M

    @classmethod
    def large(cls) -> BertConfig:
        return cls(n_layers=24, d_model=1024, n_heads=16, d_ff=4096)  # 335M

    @classmethod
    def minilm_l6(cls) -> BertConfig:
        """all-MiniLM-L6-v2 (Wang et al., 2020, MiniLM; sentence-transformers): 6 layers of width 384."""
        return cls(n_layers=6, d_model=384, n_heads=12, d_ff=1536)


class Bert(nn.Module):
    """The encoder with its pooler.

    forward(input_ids (B, T), token_type_ids (B, T) = zeros, attention_mask (B, T) 1 = real token) ->
    (hidden (B, T, C), pooled (B, C)); pooled = tanh(W h_[CLS] + b).
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        c = config.d_model
        self.tok_emb = nn.Embedding(config.vocab_size, c)
        self.pos_emb = nn.Embedding(config.n_ctx, c)
        self.type_emb = nn.Embedding(config.type_vocab_size, c)
        self.emb_norm = LayerNorm(c, eps=config.norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(TransformerBlock(config.block()) for _ in range(config.n_layers))
        self.pooler = nn.Linear(c, c)
        self.apply(init_weights)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, T), got {tuple(input_ids.shape)}")
        t = input_ids.shape[1]
        check_length(t, self.config.n_ctx)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(t, device=input_ids.device)  # (T,)
        x = self.tok_emb(input_ids) + self.pos_emb(positions) + self.type_emb(token_type_ids)  # (B, T, C)
        x = self.drop(self.emb_norm(x))
        mask = None if attention_mask is None else padding_mask(attention_mask)  # (B, 1, 1, T)
        for block in self.blocks:
            x = block(x, mask=mask)  # (B, T, C)
        pooled = torch.tanh(self.pooler(x[:, 0]))  # (B, C)
        return x, pooled


class BertForPreTraining(nn.Module):
    """BERT with its two pre-training heads.

    forward(input_ids, token_type_ids, attention_mask) -> (mlm_logits (B, T, V), nsp_logits (B, 2)).
    MLM head: dense -> GELU -> LayerNorm -> tied decoder + bias; NSP head: linear over the pooled output.
    """

    def __init__(self, config: BertConfig) -> None:
        super().__init__()
        self.config = config
        c = config.d_model
        self.bert = Bert(config)
        self.mlm_dense = nn.Linear(c, c)
        self.mlm_norm = LayerNorm(c, eps=config.norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.nsp = nn.Linear(c, 2)
        init_weights(self.mlm_dense)
        init_weights(self.nsp)

    def forward(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = self.bert(input_ids, token_type_ids, attention_mask)  # (B, T, C), (B, C)
        h = self.mlm_norm(F.gelu(self.mlm_dense(hidden)))  # (B, T, C)
        mlm_logits = h @ self.bert.tok_emb.weight.T + self.mlm_bias  # (B, T, V), decoder tied to the embedding
        return mlm_logits, self.nsp(pooled)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Average of hidden (B, T, C) over real tokens (attention_mask (B, T), 1 = real) -> (B, C)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype)[..., None]  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
