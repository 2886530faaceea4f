"""T5-style encoder-decoder built from `companion.nn` blocks.

Raffel et al. (2020), "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer" (T5 v1.0):
pre-norm RMSNorm blocks without biases, a ReLU feed-forward network, no 1/sqrt(D) factor in attention (T5's
initialisation absorbs it), and a learned *relative position bias*: the signed distance key - query is put into
log-spaced buckets, each bucket has one learned scalar per head, and the resulting (H, T, S) table is added to the
scores of every self-attention layer (computed once per stack, shared by its layers; cross-attention has none).
The output head is tied to the shared embedding and sees the decoder state scaled by C^-0.5. The bias is passed
to the blocks as an additive attention mask, so the blocks need no T5-specific code. Gated-GELU (T5 v1.1) is not
implemented; the head dim must be C / H.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from companion.models.base import init_weights
from companion.nn.attention import Backend, merge_masks, padding_mask
from companion.nn.block import BlockConfig, TransformerBlock
from companion.nn.layers import RMSNorm


@dataclass(frozen=True)
class T5Config:
    """Shape of a T5-style model. Presets: `tiny`, `small` (60M), `base` (220M)."""

    vocab_size: int = 32128  # V, SentencePiece vocabulary (padded to a multiple of 128)
    n_layers: int = 6  # encoder blocks
    n_decoder_layers: int | None = None  # decoder blocks (None: n_layers)
    d_model: int = 512  # C, residual width
    n_heads: int = 8  # H, attention heads (head dim C / H)
    d_ff: int = 2048  # ReLU FFN hidden width
    num_buckets: int = 32  # relative position buckets
    max_distance: int = 128  # distances beyond this share the last bucket
    norm_eps: float = 1e-6  # RMSNorm epsilon
    dropout: float = 0.1  # dropout (training only)
    decoder_start_token_id: int = 0  # the decoder input starts with the pad token
    eos_token_id: int = 1  # end of sequence
    backend: Backend = "torch"  # attention kernel

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layers", "num_buckets", "max_distance"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.n_decoder_layers is not None and self.n_decoder_layers < 1:
            raise ValueError(f"n_decoder_layers must be positive, got {self.n_decoder_layers!r}")
        self.block(decoder=True)

    @property
    def decoder_layers(self) -> int:
        return self.n_layers if self.n_decoder_layers is None else self.n_decoder_layers

    def block(self, decoder: bool) -> BlockConfig:
        return BlockConfig(d_model=self.d_model, n_heads=self.n_heads, d_ff=self.d_ff, norm="rms",
                           norm_eps=self.norm_eps, ffn="relu", pre_norm=True, causal=decoder,
                           cross_attention=decoder, bias=False, dropout=self.dropout, backend=self.backend,
                           attn_scale=1.0)

    @classmethod
    def tiny(cls) -> T5Config:
        return cls(vocab_size=256, n_layers=2, d_model=64, n_heads=4, d_ff=256, num_buckets=16, max_distance=32,
                   dropout=0.0)

    @classmethod
    def small(cls) -> T5Config:
        return cls()  # 60M

    @classmethod
    def base(cls) -> T5Config:
        return cls(n_layers=12, d_model=768, n_heads=12, d_ff=3072)  # 220M


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each signed distance key - query (T5): half the buckets are exact small distances, the rest grow
    logarithmically up to ``max_distance``; a bidirectional stack spends half its buckets on each sign, a causal one
    only looks back."""
    bucket = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    max_exact = num_buckets // 2
    large = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).long()
    large = large.clamp(max=num_buckets - 1)
    return bucket + torch.where(distance < max_exact, distance, large)


class RelativePositionBias(nn.Module):
    """forward(t, s, offset=0) -> additive bias (1, H, T, S) for queries at offset..offset+T-1 and keys 0..S-1."""

    def __init__(self, n_heads: int, num_buckets: int, max_distance: int, bidirectional: bool) -> None:
        super().__init__()
        self.num_buckets, self.max_distance, self.bidirectional = num_buckets, max_distance, bidirectional
        self.embedding = nn.Embedding(num_buckets, n_heads)

    def forward(self, t: int, s: int, offset: int = 0) -> torch.Tensor:
        device = self.embedding.weight.device
        relative = torch.arange(s, device=device)[None, :] - torch.arange(offset, offset + t, device=device)[:, None]
        buckets = relative_position_bucket(relative, self.bidirectional, self.num_buckets, self.max_distance)  # (T, S)
        return self.embedding(buckets).permute(2, 0, 1)[None]  # (1, H, T, S)


class T5(nn.Module):
    """forward(input_ids (B, S), decoder_input_ids (B, T), attention_mask (B, S)) -> logits (B, T, V)."""

    def __init__(self, config: T5Config) -> None:
        super().__init__()
        self.config = config
        c, h = config.d_model, config.n_heads
        self.shared = nn.Embedding(config.vocab_size, c)
        self.drop = nn.Dropout(config.dropout)
        self.encoder_bias = RelativePositionBias(h, config.num_buckets, config.max_distance, bidirectional=True)
        self.encoder = nn.ModuleList(TransformerBlock(config.block(decoder=False)) for _ in range(config.n_layers))
        self.encoder_norm = RMSNorm(c, eps=config.norm_eps)
        self.decoder_bias = RelativePositionBias(h, config.num_buckets, config.max_distance, bidirectional=False)
        self.decoder = nn.ModuleList(TransformerBlock(config.block(decoder=True)) for _ in range(config.decoder_layers))
        self.decoder_norm = RMSNorm(c, eps=config.norm_eps)
        self.apply(lambda m: init_weights(m, std=1.0 / math.sqrt(c)))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, S) -> encoder states (B, S, C)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must have shape (B, S), got {tuple(input_ids.shape)}")
        s = input_ids.shape[1]
        mask = merge_masks(self.encoder_bias(s, s), None if attention_mask is None else padding_mask(attention_mask))
        x = self.drop(self.shared(input_ids))  # (B, S, C)
        for block in self.encoder:
            x = block(x, mask=mask)  # (B, S, C)
        return self.drop(self.encoder_norm(x))

    def decode(
        self, decoder_input_ids: torch.Tensor, memory: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """decoder_input_ids (B, T), memory (B, S, C) from `encode` -> logits (B, T, V)."""
        if decoder_input_ids.dim() != 2:
            raise ValueError(f"decoder_input_ids must have shape (B, T), got {tuple(decoder_input_ids.shape)}")
        t = decoder_input_ids.shape[1]
        bias = self.decoder_bias(t, t)  # (1, H, T, T); the block adds the causal mask
        context_mask = None if attention_mask is None else padding_mask(attention_mask)  # (B, 1, 1, S)
        x = self.drop(self.shared(decoder_input_ids))  # (B, T, C)
        for block in self.decoder:
            x = block(x, mask=bias, context=memory, context_mask=context_mask)  # (B, T, C)
        x = self.drop(self.decoder_norm(x)) * self.config.d_model**-0.5  # tied head: rescale (T5 v1.0)
        return x @ self.shared.weight.T  # (B, T, V)

    def forward(
        self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.decode(decoder_input_ids, self.encode(input_ids, attention_mask), attention_mask)

    @torch.no_grad()
    def generate_greedy(
        self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Greedy decoding from ``decoder_start_token_id``: returns (B, 1 + max_new_tokens) decoder ids."""
        was_training = self.training
        self.eval()
        memory = self.encode(input_ids, attention_mask)  # (B, S, C), computed once
        out = torch.full((input_ids.shape[0], 1), self.config.decoder_start_token_id, device=input_ids.device)
        for _ in range(max_new_tokens):
            logits = self.decode(out, memory, attention_mask)  # (B, T, V)
            out = torch.cat([out, logits[:, -1].argmax(dim=-1, keepdim=True)], dim=1)
        self.train(was_training)
        return out
