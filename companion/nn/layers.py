"""Normalisation and feed-forward layers of a Transformer block.

LayerNorm from Ba et al. (2016); RMSNorm from Zhang & Sennrich (2019), which drops the mean and the bias; the
position-wise feed-forward network of Vaswani et al. (2017) with GELU (exact, or GPT-2's tanh approximation) or
ReLU, and the gated SwiGLU variant of Shazeer (2020) used by LLaMA. Norms compute in at least float32 and cast back,
as LLaMA does: bf16/fp16 are upcast to float32, float32 and float64 stay as they are (see `_compute_dtype`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

NormKind = Literal["layer", "rms"]
FFNKind = Literal["gelu", "gelu_tanh", "relu", "swiglu"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a norm computes in: float32 for bf16/fp16/float32, float64 for float64 (``x.float()`` would
    silently turn a float64 check into a float32 one)."""
    return torch.promote_types(dtype, torch.float32)


class LayerNorm(nn.Module):
    """y = (x - mean) / sqrt(var + eps) * weight + bias over the last dimension (biased variance).

    One ``F.layer_norm`` kernel (4.4 writes the formula out and checks it against this): it saves only its input and
    a float32 mean and rstd per token for the backward, where the eight elementwise ops of the formula save three
    C-wide tensors, and a GPT training step runs 10-17% faster (`benchmarks/train_step.py`).
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(_compute_dtype(x.dtype))
        bias = None if self.bias is None else self.bias.to(h.dtype)
        return F.layer_norm(h, self.weight.shape, self.weight.to(h.dtype), bias, self.eps).to(x.dtype)


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dimension."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(_compute_dtype(x.dtype))
        y = h * torch.rsqrt(h.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (y * self.weight).to(x.dtype)


def make_norm(kind: NormKind, dim: int, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """Build a "layer" (LayerNorm) or "rms" (RMSNorm) normalisation."""
    if kind == "layer":
        return LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rms":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be 'layer' or 'rms', got {kind!r}")


class FeedForward(nn.Module):
    """Position-wise FFN, (B, T, C) -> (B, T, C).

    "gelu"/"gelu_tanh"/"relu": down(act(up(x))). "swiglu": down(silu(gate(x)) * up(x)), three matrices, so LLaMA
    takes the hidden width as about 2/3 of 4C to keep the parameter count of the two-matrix version.
    """

    def __init__(self, dim: int, hidden: int, kind: FFNKind = "gelu", bias: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        if kind not in ("gelu", "gelu_tanh", "relu", "swiglu"):
            raise ValueError(f"ffn must be 'gelu', 'gelu_tanh', 'relu' or 'swiglu', got {kind!r}")
        if hidden < 1:
            raise ValueError(f"hidden width must be positive, got {hidden!r}")
        self.kind = kind
        self.up = nn.Linear(dim, hidden, bias=bias)
        self.gate = nn.Linear(dim, hidden, bias=bias) if kind == "swiglu" else None
        self.down = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            h = F.silu(self.gate(x)) * self.up(x)  # (B, T, hidden)
        elif self.kind == "gelu":
            h = F.gelu(self.up(x))  # (B, T, hidden)
        elif self.kind == "gelu_tanh":  # GPT-2's approximation 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3)))
            h = F.gelu(self.up(x), approximate="tanh")  # (B, T, hidden)
        else:
            h = F.relu(self.up(x))  # (B, T, hidden)
        return self.dropout(self.down(h))


def swiglu_hidden(dim: int, multiple_of: int = 64) -> int:
    """LLaMA's SwiGLU width: 2/3 of 4 * dim, rounded up to a multiple of ``multiple_of``."""
    hidden = int(2 * 4 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)
