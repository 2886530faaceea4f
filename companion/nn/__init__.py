"""Neural-network building blocks of chapter 4: attention, positional encodings, norms, feed-forward, blocks.

Shapes follow the package notation (B batch, T time, S source length, H heads, G key/value groups, D head dim,
C model width). Later chapters build GPT, LLaMA, BERT and T5-style models from `TransformerBlock`.
"""

from companion.nn.attention import (
    AttentionConfig,
    KVCache,
    KVCacheLike,
    MultiHeadAttention,
    causal_mask,
    kv_cache_bytes_per_token,
    merge_masks,
    padding_mask,
    scaled_dot_product_attention,
    sliding_window_mask,
    to_additive,
)
from companion.nn.block import BlockConfig, TransformerBlock
from companion.nn.flash import (count_blocks, online_logsumexp, online_softmax, peak_tensor_bytes, tiled_attention,
                               tiled_attention_backward)
from companion.nn.layers import FeedForward, LayerNorm, RMSNorm, make_norm, swiglu_hidden
from companion.nn.mla import MLAConfig, MultiHeadLatentAttention
from companion.nn.moe import (MoE, MoEConfig, expert_counts, load_balancing_loss, record_router_logits, router_probs,
                              router_z_loss)
from companion.nn.positional import (
    LearnedPositionalEmbedding,
    RopeScaling,
    RotaryEmbedding,
    SinusoidalPositionalEncoding,
    alibi_bias,
    alibi_slopes,
    rotate_half,
    sinusoidal_positions,
)

__all__ = [
    "AttentionConfig",
    "BlockConfig",
    "FeedForward",
    "KVCache",
    "KVCacheLike",
    "LayerNorm",
    "LearnedPositionalEmbedding",
    "MultiHeadAttention",
    "RMSNorm",
    "RopeScaling",
    "RotaryEmbedding",
    "SinusoidalPositionalEncoding",
    "TransformerBlock",
    "alibi_bias",
    "alibi_slopes",
    "causal_mask",
    "make_norm",
    "merge_masks",
    "padding_mask",
    "rotate_half",
    "scaled_dot_product_attention",
    "sinusoidal_positions",
    "swiglu_hidden",
    "to_additive",
    # online softmax and tiled (FlashAttention-style) attention
    "count_blocks",
    "online_logsumexp",
    "online_softmax",
    "peak_tensor_bytes",
    "tiled_attention",
    "tiled_attention_backward",
    # mixture of experts
    "MoE",
    "MoEConfig",
    "expert_counts",
    "load_balancing_loss",
    "record_router_logits",
    "router_probs",
    "router_z_loss",
    # attention variants: sliding window, KV-cache size, multi-head latent attention
    "MLAConfig",
    "MultiHeadLatentAttention",
    "kv_cache_bytes_per_token",
    "sliding_window_mask",
]
