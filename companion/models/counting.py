"""Parameter counts and FLOPs per token of the chapter 5 configs, computed from the config alone.

FLOPs follow Kaplan et al. (2020), "Scaling Laws for Neural Language Models", Table 1: a forward pass costs about
2N + 2 * n_layers * n_ctx * d_attn FLOPs per token, with N the *non-embedding* parameters (every weight is one
multiply-add) and the second term the attention scores and their weighted sum; training (forward + backward) costs
three times that, 6N + 6 * n_layers * n_ctx * d_attn. Hoffmann et al. (2022, Chinchilla, Appendix F) count the
attention term twice as large (QK^T and AV separately) and include the output layer; the difference is small while
n_ctx << 12 * d_model. The counts are exact and checked against `sum(p.numel())` of the built models.
"""

from __future__ import annotations

from companion.models.bert import BertConfig
from companion.models.gpt import GPTConfig
from companion.models.llama import LlamaConfig
from companion.models.t5 import T5Config
from companion.nn.block import BlockConfig
from companion.scaling import flops_per_token as dense_flops_per_token

AnyConfig = GPTConfig | LlamaConfig | BertConfig | T5Config


def _attention(b: BlockConfig) -> int:
    c, h = b.d_model, b.n_heads
    d = c // h
    g = b.n_kv_heads or h
    weights = c * h * d + 2 * c * g * d + h * d * c  # Wq, Wk, Wv, Wo
    return weights + ((h * d + 2 * g * d + c) if b.bias else 0)


def _ffn(b: BlockConfig) -> int:
    c, f = b.d_model, b.ffn_hidden
    if b.ffn == "swiglu":
        return 3 * c * f + ((2 * f + c) if b.bias else 0)
    return 2 * c * f + ((f + c) if b.bias else 0)


def _norm(b: BlockConfig) -> int:
    return 2 * b.d_model if b.norm == "layer" and b.bias else b.d_model


def _block(b: BlockConfig) -> dict[str, int]:
    n_attn = 2 if b.cross_attention else 1
    return {"attention": n_attn * _attention(b), "ffn": _ffn(b), "norms": (n_attn + 1) * _norm(b)}


def parameter_breakdown(config: AnyConfig, *, pretraining_heads: bool = False) -> dict[str, int]:
    """Exact parameter counts by component: embedding (token, position, segment tables), attention, ffn, norms,
    head (untied output matrix, BERT's pooler and, with ``pretraining_heads``, its MLM/NSP heads), position_bias (T5),
    and total. Tied matrices are counted once."""
    if not isinstance(config, (GPTConfig, LlamaConfig, BertConfig, T5Config)):
        raise TypeError(f"expected a GPT, Llama, BERT or T5 config, got {type(config).__name__}")
    c, v = config.d_model, config.vocab_size
    out = {"embedding": v * c, "attention": 0, "ffn": 0, "norms": 0, "head": 0, "position_bias": 0}

    def add_blocks(b: BlockConfig, n: int) -> None:
        for key, value in _block(b).items():
            out[key] += n * value

    if isinstance(config, GPTConfig):
        out["embedding"] += config.n_ctx * c
        add_blocks(config.block(), config.n_layers)
        out["norms"] += 2 * c
        out["head"] = 0 if config.tie_embeddings else v * c
    elif isinstance(config, LlamaConfig):
        add_blocks(config.block(), config.n_layers)
        out["norms"] += c
        out["head"] = 0 if config.tie_embeddings else v * c
    elif isinstance(config, BertConfig):
        out["embedding"] += (config.n_ctx + config.type_vocab_size) * c
        add_blocks(config.block(), config.n_layers)
        out["norms"] += 2 * c  # embedding LayerNorm
        out["head"] = c * c + c  # pooler
        if pretraining_heads:
            out["head"] += c * c + c + v + 2 * c + 2  # MLM dense, MLM bias, NSP (MLM decoder is tied)
            out["norms"] += 2 * c  # MLM LayerNorm
    elif isinstance(config, T5Config):
        add_blocks(config.block(decoder=False), config.n_layers)
        add_blocks(config.block(decoder=True), config.decoder_layers)
        out["norms"] += 2 * c  # final norm of each stack
        out["position_bias"] = 2 * config.num_buckets * config.n_heads
    out["total"] = sum(out.values())
    return out


def count_parameters(config: AnyConfig, *, embeddings: bool = True, pretraining_heads: bool = False) -> int:
    """Total parameters; with ``embeddings=False`` Kaplan's N: without token/position tables and output matrix."""
    parts = parameter_breakdown(config, pretraining_heads=pretraining_heads)
    if embeddings:
        return parts["total"]
    untied_head = parts["head"] if isinstance(config, (GPTConfig, LlamaConfig)) else 0
    return parts["total"] - parts["embedding"] - untied_head


def flops_per_token(config: AnyConfig, n_ctx: int | None = None, *, training: bool = True) -> float:
    """Kaplan et al.'s FLOPs per token: 6N + 6 * n_layers * n_ctx * d_attn for training, a third for a forward pass.

    N excludes embeddings (see `count_parameters`); ``n_ctx`` defaults to the config's context length (512 for T5,
    which has none). For T5 the figure is per target token with a source of the same length: both stacks run once,
    and the decoder attends over n_ctx keys twice (self and cross).
    """
    if n_ctx is None:
        n_ctx = 512 if isinstance(config, T5Config) else config.n_ctx
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
    n = count_parameters(config, embeddings=False)
    layers = config.n_layers + 2 * config.decoder_layers if isinstance(config, T5Config) else config.n_layers
    attention = 2.0 * layers * n_ctx * config.d_model  # forward: scores and weighted sum (d_attn = H * D = C)
    return dense_flops_per_token(n, training=training) + (3.0 if training else 1.0) * attention
