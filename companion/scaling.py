"""Scaling arithmetic: training compute, FLOPs per token, compute-optimal model size, weight memory.

References: the C ~= 6ND rule and FLOPs per token from Kaplan et al. 2020 ("Scaling Laws for Neural
Language Models", Table 1); the compute-optimal split and the fitted loss law
L(N, D) = E + A / N**alpha + B / D**beta from Hoffmann et al. 2022 ("Training Compute-Optimal Large
Language Models", Approach 3, eq. 10; the ~20 tokens per parameter of its Table 3), and the refit of the same
law by Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt", arXiv:2404.10102).
Design: plain floats in, floats out (:func:`flops_per_token` also takes a model config, and then counts its
parameters exactly); every count must be positive and finite, else ``ValueError``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from companion.models.counting import AnyConfig

CHINCHILLA_TOKENS_PER_PARAM = 20.0  # Hoffmann et al. 2022, Table 3: ~20 training tokens per parameter

# Bytes needed to store one parameter in each storage format (int4 packs two weights per byte).
BYTES_PER_PARAM: dict[str, float] = {
    "fp32": 4.0,
    "fp16": 2.0,
    "bf16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
    "int4": 0.5,
}


def _positive(name: str, value: float) -> float:
    """Return ``value`` as a float if it is a positive finite number, else raise naming it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be positive and finite, got {value!r}")
    return float(value)


def flops_per_token(model: float | AnyConfig, n_ctx: int | None = None, *, training: bool = True, head: bool = False,
                    full_attention: bool = False) -> float:
    """FLOPs per token (Kaplan et al. 2020, Table 1): a forward pass costs 2N + 2 * n_layers * n_ctx * d_attn,
    with N the non-embedding parameters (one multiply-add per weight) and the second term the attention scores
    and their weighted sum; training (forward + backward, the backward about twice the forward) costs 3x that.

    ``model`` is either N itself, which gives the dense term alone (2N, or 6N for training; the attention term
    is small while n_ctx << 12 * d_model), or a GPT, Llama, BERT or T5 config, whose exact N
    (:func:`companion.models.count_parameters` without embeddings), layers and width give both terms.
    ``n_ctx`` defaults to the config's context length (512 for T5, which has none). For T5 the figure is per
    target token with a source of the same length: both stacks run once, and the decoder attends over n_ctx
    keys twice (self and cross). Hoffmann et al. (2022, Appendix F) count the attention term twice as large and
    include the output layer; the difference is small while n_ctx << 12 * d_model.

    Two options, off by default, count what a kernel actually computes (``FlopCounterMode`` agrees with them; see
    tests/test_scaling.py): ``head=True`` adds the output layer, 2 * V * d_model per forward (Kaplan's "de-embed",
    left out of his C_forward); ``full_attention=True`` doubles the attention term to 4 * n_layers * n_ctx * d_model,
    Q K^T and the weighted sum with every query against all n_ctx keys, as a dense attention kernel computes them
    (Kaplan's term equals them with each query attending to n_ctx / 2 keys on average, a causal mask exploited).
    The remaining gap to a matmul count is N's biases and norm weights, counted here at 2 FLOPs each per token.
    """
    passes = 3.0 if training else 1.0  # forward only, or forward + backward
    if not dataclasses.is_dataclass(model):
        if n_ctx is not None:
            raise ValueError(f"n_ctx={n_ctx!r} needs a model config: a parameter count alone gives no layers or width")
        if head or full_attention:
            raise ValueError(f"head={head!r}, full_attention={full_attention!r} need a model config: a parameter count "
                             "alone gives no vocabulary, layers or width")
        return passes * 2.0 * _positive("n_params", model)
    from companion.models.counting import count_parameters  # a config: the models are needed to count N
    from companion.models.t5 import T5Config

    n = count_parameters(model, embeddings=False, active=True)  # per token: a mixture of experts counts the experts it runs
    if n_ctx is None:
        n_ctx = 512 if isinstance(model, T5Config) else model.n_ctx
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int) or n_ctx < 1:
        raise ValueError(f"n_ctx must be a positive int, got {n_ctx!r}")
    layers = model.n_layers + 2 * model.decoder_layers if isinstance(model, T5Config) else model.n_layers
    attention = (4.0 if full_attention else 2.0) * layers * n_ctx * model.d_model  # scores, weighted sum (d_attn = C)
    output = 2.0 * model.vocab_size * model.d_model if head else 0.0  # logits: (C) @ (C, V) per token
    return passes * (2.0 * n + attention + output)


def training_flops(n_params: float, n_tokens: float) -> float:
    """Total training compute C ~= 6 * N * D in FLOPs (N parameters, D training tokens)."""
    return flops_per_token(n_params, training=True) * _positive("n_tokens", n_tokens)


def chinchilla_optimal(
    compute: float, tokens_per_param: float = CHINCHILLA_TOKENS_PER_PARAM
) -> tuple[float, float]:
    """Compute-optimal ``(n_params, n_tokens)`` for a budget of ``compute`` FLOPs under the rule of thumb
    D = r * N (r ~= 20, Hoffmann et al. 2022): from C = 6 N D = 6 r N**2, N = sqrt(C / (6 r)), D = r N."""
    c = _positive("compute", compute)
    r = _positive("tokens_per_param", tokens_per_param)
    n = math.sqrt(c / (6.0 * r))
    return n, r * n


@dataclass(frozen=True)
class ChinchillaLaw:
    """Parametric loss L(N, D) = E + A / N**alpha + B / D**beta (Hoffmann et al. 2022, eq. 2)."""

    E: float  # irreducible loss: entropy of natural text (nats per token)
    A: float  # scale of the finite-model-size term
    B: float  # scale of the finite-data term
    alpha: float  # exponent of model size N
    beta: float  # exponent of training tokens D

    def __post_init__(self) -> None:
        for name in ("A", "B", "alpha", "beta"):
            _positive(name, getattr(self, name))
        if isinstance(self.E, bool) or not isinstance(self.E, (int, float)) or not math.isfinite(self.E) or self.E < 0:
            raise ValueError(f"E must be a non-negative finite number, got {self.E!r}")

    @classmethod
    def hoffmann2022(cls) -> ChinchillaLaw:
        """The fit reported by Hoffmann et al. 2022 (Approach 3, Section 3.3)."""
        return cls(E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28)

    @classmethod
    def besiroglu2024(cls) -> ChinchillaLaw:
        """The refit by Besiroglu et al. 2024 of Approach 3 on data reconstructed from Hoffmann et al.'s Figure 4:
        alpha ~= beta, so N_opt and D_opt grow at nearly the same rate, as Hoffmann's Approaches 1 and 2 found."""
        return cls(E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658)

    def loss(self, n_params: float, n_tokens: float) -> float:
        """Predicted final training loss (nats per token) of N parameters trained on D tokens."""
        n = _positive("n_params", n_params)
        d = _positive("n_tokens", n_tokens)
        return self.E + self.A / n**self.alpha + self.B / d**self.beta

    @property
    def exponents(self) -> tuple[float, float]:
        """(a, b) with N_opt ∝ C**a and D_opt ∝ C**b: a = beta / (alpha + beta), b = alpha / (alpha + beta)."""
        s = self.alpha + self.beta
        return self.beta / s, self.alpha / s

    def compute_optimal(self, compute: float) -> tuple[float, float]:
        """Minimise L(N, D) subject to 6 N D = C (Hoffmann et al. 2022, eq. 4):
        N_opt = G (C/6)**a, D_opt = (C/6)**b / G with G = (alpha A / (beta B))**(1 / (alpha + beta))."""
        c6 = _positive("compute", compute) / 6.0
        a, b = self.exponents
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))
        return g * c6**a, c6**b / g


def weight_memory_bytes(n_params: float, precision: str = "bf16") -> float:
    """Bytes to hold ``n_params`` weights in ``precision`` (weights only: no gradients, optimizer
    states, activations or KV cache)."""
    n = _positive("n_params", n_params)
    if precision not in BYTES_PER_PARAM:
        raise ValueError(f"precision must be one of {sorted(BYTES_PER_PARAM)}, got {precision!r}")
    return n * BYTES_PER_PARAM[precision]

