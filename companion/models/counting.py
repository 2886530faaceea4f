"""Parameter counts of the chapter 5 configs, computed from the config alone.

The counts are exact and checked against `sum(p.numel())` of the built models. Kaplan et al.'s (2020) N, the
*non-embedding* parameters (`count_parameters(config, embeddings=False)`), is what
:func:`companion.scaling.flops_per_token` multiplies into FLOPs per token (re-exported as
`companion.models.flops_per_token`).

Mixture-of-experts models (a `GPTConfig` with ``moe``, or any GPT/Llama config with ``moe=`` given, e.g. Mixtral as
a Llama with a `MoEConfig`) have two counts: ``total`` (every expert, what memory holds) and, with ``active=True``,
the parameters one token passes through (router, its top-k routed experts and the shared experts).
"""

from __future__ import annotations

from companion.models.bert import BertConfig
from companion.models.gpt import GPTConfig
from companion.models.llama import LlamaConfig
from companion.models.t5 import T5Config
from companion.nn.block import BlockConfig
from companion.nn.moe import MoEConfig

AnyConfig = GPTConfig | LlamaConfig | BertConfig | T5Config


def _attention(b: BlockConfig) -> int:
    c, h = b.d_model, b.n_heads
    d = c // h
    g = b.n_kv_heads or h
    weights = c * h * d + 2 * c * g * d + h * d * c  # Wq, Wk, Wv, Wo
    return weights + ((h * d + 2 * g * d + c) if b.bias else 0)


def _ffn(b: BlockConfig, moe: MoEConfig | None = None, active: bool = False) -> int:
    if moe is not None:
        return moe.n_params(b.d_model, active=active)  # router + experts
    c, f = b.d_model, b.ffn_hidden
    if b.ffn == "swiglu":
        return 3 * c * f + ((2 * f + c) if b.bias else 0)
    return 2 * c * f + ((f + c) if b.bias else 0)


def _norm(b: BlockConfig) -> int:
    return 2 * b.d_model if b.norm == "layer" and b.bias else b.d_model


def _block(b: BlockConfig, moe: MoEConfig | None = None, active: bool = False) -> dict[str, int]:
    n_attn = 2 if b.cross_attention else 1
    return {"attention": n_attn * _attention(b), "ffn": _ffn(b, moe, active), "norms": (n_attn + 1) * _norm(b)}


def parameter_breakdown(config: AnyConfig, *, pretraining_heads: bool = False, moe: MoEConfig | None = None,
                        active: bool = False) -> dict[str, int]:
    """Exact parameter counts by component: embedding (token, position, segment tables), attention, ffn, norms,
    head (untied output matrix, BERT's pooler and, with ``pretraining_heads``, its MLM/NSP heads), position_bias (T5),
    and total. Tied matrices are counted once.

    ``moe``: every block's FFN is this mixture of experts (GPT/Llama configs; default: a `GPTConfig`'s own ``moe``);
    "ffn" then counts the routers and experts. ``active``: count only what one token uses (for a dense model, all)."""
    if not isinstance(config, (GPTConfig, LlamaConfig, BertConfig, T5Config)):
        raise TypeError(f"expected a GPT, Llama, BERT or T5 config, got {type(config).__name__}")
    if moe is None and isinstance(config, GPTConfig):
        moe = config.moe
    if moe is not None and not isinstance(config, (GPTConfig, LlamaConfig)):
        raise ValueError(f"moe is supported for GPT and Llama configs, got {type(config).__name__}")
    c, v = config.d_model, config.vocab_size
    out = {"embedding": v * c, "attention": 0, "ffn": 0, "norms": 0, "head": 0, "position_bias": 0}

    def add_blocks(b: BlockConfig, n: int) -> None:
        for key, value in _block(b, moe, active).items():
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


def count_parameters(config: AnyConfig, *, embeddings: bool = True, pretraining_heads: bool = False,
                     moe: MoEConfig | None = None, active: bool = False) -> int:
    """Total parameters; with ``embeddings=False`` Kaplan's N: without token/position tables and output matrix.
    ``moe`` and ``active`` as in :func:`parameter_breakdown` (``active=True``: parameters used per token)."""
    parts = parameter_breakdown(config, pretraining_heads=pretraining_heads, moe=moe, active=active)
    if embeddings:
        return parts["total"]
    untied_head = parts["head"] if isinstance(config, (GPTConfig, LlamaConfig)) else 0
    return parts["total"] - parts["embedding"] - untied_head
