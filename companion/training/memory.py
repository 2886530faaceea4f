"""Memory of one training step: weights, gradients, optimizer states and activations, per data-parallel rank.

Model states follow ZeRO (Rajbhandari et al., 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models"): Adam keeps two fp32 moments per parameter, plus an fp32 master copy when the weights live in 16 bits (their
2 + 2 + 12 = 16 bytes per parameter); stage 1 shards the optimizer states over N ranks, stage 2 also the gradients,
stage 3 (FSDP) also the weights. Activations are counted as in Korthikanti et al. (2022), "Reducing Activation
Recomputation in Large Transformer Models" (their 34sbh + 5as^2b bytes per layer), but tensor by tensor for *this*
package's forward (`companion.nn.block`): what autograd saves for the backward, the figure
`torch.autograd.graph.saved_tensors_hooks` measures in the tests. Design choices, where the paper differs:

* Norms compute in float32. LayerNorm is one ``F.layer_norm`` kernel: it keeps its float32 input and a mean and a
  rstd per token. RMSNorm is written from the primitive ops: it keeps its input and the normalised x (two C-wide
  float32 tensors) and one rsqrt per token.
* backend="torch" (`F.scaled_dot_product_attention`, a flash-style kernel) keeps q, k, v, the output and a float32
  log-sum-exp, no T x T matrix; backend="math" keeps the softmax output (B, H, T, T) and a (T, T) boolean mask.
  Under CUDA autocast softmax runs in float32 and the matmul takes a 16-bit copy: 4 + 2 bytes per score.
* Dropout masks (p > 0) are counted as CUDA's native_dropout keeps them, one byte per element; the flash kernel
  regenerates its attention-dropout mask. (The CPU dropout keeps float masks, so the CPU tests use p = 0.)
* Autocast ("bf16", "fp16") keeps float32 parameters and residual stream; every Linear saves its own 16-bit copy of a
  float32 input, and the 16-bit copy of every weight matrix is saved too (counted in `activations`, as the hooks see
  it). At ZeRO stage 3 those copies are gathered block by block and freed (FSDP mixed precision): not counted.
* "bf16-pure" stores the model in bfloat16 (2 bytes weights and gradients) with an fp32 master copy in the optimizer.
* Activation checkpointing keeps each block's input and recomputes one block at a time during the backward.
* The loss is `companion.objectives.causal_lm_loss` of the logits: a float32 log-softmax over T - 1 positions and
  int64 labels. With ``fused_head`` it is the model's ``labels=`` path (`companion.objectives.linear_cross_entropy`,
  the trainer's): no logits, the head saves d hidden (B, T, C) and d weight (V, C), and autocast makes no saved
  16-bit copy of the output matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from companion.models.counting import count_parameters
from companion.models.gpt import GPTConfig
from companion.models.llama import LlamaConfig

PrecisionName = Literal["fp32", "bf16", "fp16", "bf16-pure"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "bf16-pure")
AUTOCAST = ("bf16", "fp16")  # torch.autocast over float32 parameters (fp16 also needs a GradScaler: a few bytes)
FP32, INT64, MASK = 4, 8, 1  # bytes of a float32, an int64 and a dropout / attention mask element
GIB = 2**30
DecoderConfig = GPTConfig | LlamaConfig


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one data-parallel rank holds at the peak of a training step."""

    weights: int  # parameters (their shard at ZeRO stage 3)
    grads: int  # gradients, same dtype as the parameters (their shard from stage 2)
    optimizer: int  # AdamW's two moments, plus the fp32 master copy for "bf16-pure" (their shard from stage 1)
    activations: int  # tensors saved for the backward of one micro-batch

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations


def gib(n_bytes: float) -> float:
    """Bytes in GiB (2**30 bytes)."""
    return n_bytes / GIB


def format_gib(n_bytes: float, digits: int = 1) -> str:
    """'12.3 GiB'."""
    return f"{gib(n_bytes):.{digits}f} GiB"


def bytes_per_parameter(precision: PrecisionName) -> tuple[int, int, int]:
    """(weight, gradient, optimizer-state) bytes per parameter with AdamW: fp32 and autocast 4 + 4 + 8, bf16-pure
    2 + 2 + 12 (moments plus master copy), before any ZeRO sharding."""
    _check_precision(precision)
    return (2, 2, 12) if precision == "bf16-pure" else (4, 4, 8)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def _check_config(config: object) -> None:
    if not isinstance(config, (GPTConfig, LlamaConfig)):
        raise TypeError(f"expected a GPTConfig or LlamaConfig, got {type(config).__name__}")


def _check_shape(config: DecoderConfig, batch_size: int, seq_len: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 2 <= seq_len <= config.n_ctx:
        raise ValueError(f"seq_len must be an int in [2, n_ctx={config.n_ctx}] (the loss predicts T - 1 "
                         f"tokens), got {seq_len!r}")


def matrix_parameters(config: DecoderConfig) -> int:
    """Parameters in the weight matrices of all Linear layers (what autocast copies to 16 bits): Wq, Wk, Wv, Wo and
    the FFN matrices of every block, and the output head (once, tied or not). No biases, norms or embeddings."""
    _check_config(config)
    b = config.block()
    c, h, g, d = b.d_model, b.n_heads, b.n_kv_heads or b.n_heads, b.d_model // b.n_heads
    attention = 2 * c * h * d + 2 * c * g * d
    ffn = (3 if b.ffn == "swiglu" else 2) * c * b.ffn_hidden
    return config.n_layers * (attention + ffn) + config.vocab_size * c


def _norm_bytes(kind: str, c: int) -> int:
    """Per token, inside a norm computing in float32: LayerNorm's fused kernel keeps its input, a mean and a rstd;
    RMSNorm (primitive ops) keeps its input, the normalised x and a rsqrt."""
    return FP32 * c + 2 * FP32 if kind == "layer" else 2 * FP32 * c + FP32


def _norm_weight_copies(kind: str, c: int, precision: str, bias: bool) -> int:
    """Per norm, not per token: under "bf16-pure" LayerNorm casts its bf16 gain (and bias) to float32 for the
    float32 kernel, which saves the copies."""
    return FP32 * c * (2 if bias else 1) if kind == "layer" and precision == "bf16-pure" else 0


def _linear_inputs(precision: str, c: int, readers: int) -> int:
    """Per token, a norm output as saved by the ``readers`` Linears that read it: under autocast each casts its
    own 16-bit copy of the float32 tensor; otherwise they share one tensor."""
    return readers * 2 * c if precision in AUTOCAST else (FP32 if precision == "fp32" else 2) * c


def block_activation_bytes(config: DecoderConfig, batch_size: int, seq_len: int,
                           precision: PrecisionName = "fp32") -> int:
    """Bytes one Transformer block saves for its backward, for a (batch_size, seq_len) micro-batch."""
    _check_config(config)
    _check_precision(precision)
    _check_shape(config, batch_size, seq_len)
    b, t = config.block(), seq_len
    c, h, f = b.d_model, b.n_heads, b.ffn_hidden
    g, d = b.n_kv_heads or h, c // h
    a = FP32 if precision == "fp32" else 2  # bytes of a matmul input/output
    swiglu = b.ffn == "swiglu"
    per_token = 2 * _norm_bytes(b.norm, c)  # norm1 and norm2 (their inputs are the residual stream)
    per_token += _linear_inputs(precision, c, 3) + _linear_inputs(precision, c, 2 if swiglu else 1)
    constant = 4 * t * d * FP32 if b.positional == "rope" else 0  # float32 cos and sin, for q and for k
    constant += 2 * _norm_weight_copies(b.norm, c, precision, b.bias)
    if b.backend == "torch":  # fused kernel: q, k, v (G heads), output (= out_proj input) and log-sum-exp
        per_token += a * (2 * c + 2 * g * d) + FP32 * h
    else:  # the formula: copies of q, k, v (H heads) for the matmuls, the output, the softmax and the causal mask
        per_token += 4 * a * c + h * t * (FP32 + 2 if precision in AUTOCAST else a)
        constant += t * t * MASK
        if b.dropout > 0:
            per_token += h * t * (MASK + a)  # dropout mask and dropped weights
    per_token += {"relu": 1, "gelu": 2, "gelu_tanh": 2, "swiglu": 4}[b.ffn] * a * f  # FFN hidden activations
    if b.dropout > 0:
        per_token += 2 * c * MASK  # after the attention branch and after the FFN
    return batch_size * t * per_token + constant


def head_activation_bytes(config: DecoderConfig, batch_size: int, seq_len: int,
                          precision: PrecisionName = "fp32", *, fused_head: bool = False) -> int:
    """Bytes saved outside the blocks: token ids, embedding dropout, final norm, output head input, the float32
    log-softmax and int64 labels of the loss over T - 1 positions. With ``fused_head``, d hidden and d weight (in
    the dtypes of the hidden states and of the weight) instead of the head input, log-softmax and labels. Autocast's
    weight copies are not included."""
    _check_config(config)
    _check_precision(precision)
    _check_shape(config, batch_size, seq_len)
    b, c, v = config.block(), config.d_model, config.vocab_size
    dropout = c * MASK if isinstance(config, GPTConfig) and config.dropout > 0 else 0
    per_token = INT64 + dropout + _norm_bytes(b.norm, c)
    norm_copies = _norm_weight_copies(b.norm, c, precision, b.bias)
    if fused_head:
        model_bytes = 2 if precision == "bf16-pure" else FP32  # the hidden states and the weight are in this dtype
        return batch_size * seq_len * (per_token + model_bytes * c) + v * c * model_bytes + norm_copies
    per_token += _linear_inputs(precision, c, 1)
    loss = batch_size * (seq_len - 1) * (FP32 * v + INT64) + FP32  # log-softmax output, labels, total weight
    return batch_size * seq_len * per_token + loss + norm_copies


def activation_bytes(config: DecoderConfig, batch_size: int, seq_len: int, precision: PrecisionName = "fp32", *,
                     checkpointing: bool = False, weight_copies: bool = True, fused_head: bool = False) -> int:
    """Bytes saved for the backward of one micro-batch (batch_size, seq_len).

    Without checkpointing: every block's activations. With it: every block's input (the residual stream, float32
    except for "bf16-pure") plus one recomputed block, whose first norm reads one of those inputs; the head's
    tensors are still counted (they are freed only when the backward reaches them, just before the first
    recomputation). Under autocast the 16-bit weight copies (2 bytes per matrix parameter; the output matrix not
    with ``fused_head``, which casts it without saving the copy) are added unless ``weight_copies`` is False.
    ``fused_head``: the loss of the model's ``labels=`` path (see `head_activation_bytes`).
    """
    block = block_activation_bytes(config, batch_size, seq_len, precision)
    head = head_activation_bytes(config, batch_size, seq_len, precision, fused_head=fused_head)
    if checkpointing:
        residual = 2 if precision == "bf16-pure" else FP32
        boundary = batch_size * seq_len * config.d_model * residual
        shared = boundary if residual == FP32 else 0  # bf16-pure norms save a float32 copy, not the input itself
        blocks = config.n_layers * boundary + block - shared
    else:
        blocks = config.n_layers * block
    copied = matrix_parameters(config) - (config.vocab_size * config.d_model if fused_head else 0)
    copies = 2 * copied if precision in AUTOCAST and weight_copies else 0
    return blocks + head + copies


def _shard(n_params: int, n_ranks: int, bytes_each: int) -> int:
    """Bytes of one rank's shard: the flat tensor is padded to a multiple of the rank count, as FSDP does."""
    return math.ceil(n_params / n_ranks) * bytes_each


def estimate_memory(config: DecoderConfig, batch_size: int, seq_len: int | None = None, *,
                    precision: PrecisionName = "bf16", checkpointing: bool = False, zero_stage: int = 0,
                    n_ranks: int = 1, fused_head: bool = False) -> MemoryEstimate:
    """Per-rank bytes of an AdamW training step of a GPT or Llama config.

    ``batch_size`` is the micro-batch of one rank, ``seq_len`` defaults to ``config.n_ctx``. ``zero_stage`` 0
    (plain data parallelism: every rank holds everything) to 3 shards optimizer states (1), gradients (2) and
    weights (3) over ``n_ranks``. Not counted: buffers (RoPE frequencies), DDP's gradient buckets, FSDP's transient
    gathered blocks, the gradients flowing through the backward, allocator fragmentation and the CUDA context.
    ``fused_head``: the loss of the model's ``labels=`` path, the trainer's (no logits; see `head_activation_bytes`).
    """
    _check_config(config)
    _check_precision(precision)
    seq_len = config.n_ctx if seq_len is None else seq_len
    _check_shape(config, batch_size, seq_len)
    if isinstance(zero_stage, bool) or zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    if isinstance(n_ranks, bool) or not isinstance(n_ranks, int) or n_ranks < 1:
        raise ValueError(f"n_ranks must be a positive int, got {n_ranks!r}")
    n = count_parameters(config)
    wb, gb, ob = bytes_per_parameter(precision)
    return MemoryEstimate(
        weights=_shard(n, n_ranks, wb) if zero_stage >= 3 else n * wb,
        grads=_shard(n, n_ranks, gb) if zero_stage >= 2 else n * gb,
        optimizer=_shard(n, n_ranks, ob) if zero_stage >= 1 else n * ob,
        activations=activation_bytes(config, batch_size, seq_len, precision, checkpointing=checkpointing,
                                     weight_copies=zero_stage < 3, fused_head=fused_head),
    )


def published_configs() -> dict[str, DecoderConfig]:
    """Configs of published sizes: GPT-2 small (124M), GPT-3 XL (1.3B), Llama 2 7B and Llama 2 70B."""
    return {
        "GPT-2 124M": GPTConfig.gpt2_small(),
        # Brown et al. (2020), Table 2.1: 24 layers, C = 2048, head dim 128 (so 16 heads), context 2048.
        "GPT-3 1.3B": GPTConfig(n_ctx=2048, n_layers=24, d_model=2048, n_heads=16),
        "Llama 2 7B": LlamaConfig.llama2_7b(),
        # Touvron et al. (2023b), Table 1: 80 layers, C = 8192, 64 query heads sharing 8 key/value heads.
        "Llama 2 70B": LlamaConfig(n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=28672),
    }


SCENARIOS: dict[str, dict[str, object]] = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16 + checkpointing": {"precision": "bf16", "checkpointing": True},
    "bf16 + checkpointing, ZeRO-3 x 8": {"precision": "bf16", "checkpointing": True, "zero_stage": 3,
                                         "n_ranks": 8},
}


def memory_table(configs: dict[str, DecoderConfig] | None = None, *, batch_size: int = 1, seq_len: int = 2048,
                 scenarios: dict[str, dict[str, object]] | None = None) -> list[dict[str, object]]:
    """One row per model: its name, parameter count, the sequence length used (``seq_len`` capped at the model's
    n_ctx) and, per scenario (keyword arguments of `estimate_memory`), the MemoryEstimate."""
    rows: list[dict[str, object]] = []
    for name, config in (published_configs() if configs is None else configs).items():
        t = min(seq_len, config.n_ctx)
        row: dict[str, object] = {"model": name, "params": count_parameters(config), "seq_len": t}
        for label, options in (SCENARIOS if scenarios is None else scenarios).items():
            row[label] = estimate_memory(config, batch_size, t, **options)  # type: ignore[arg-type]
        rows.append(row)
    return rows
