"""Inference-time kernel choices: the same weights and the same arithmetic, run faster on CPU.

Batch-1 decoding is a chain of matrix-vector products, and on CPU their speed depends on how the weight is laid out
and on how many cores work on it. Measured on the book's reference CPU (AMD EPYC, 2 cores, torch 2.13 with MKL;
``benchmarks/decode.py --kernels``), with the weights coming from DRAM as in decoding:

- MKL reads an (N, K) row-major weight at about a third of the memory bandwidth; the same matrix stored
  column-major (the (K, N) layout of GPT-2's Conv1D, which transformers keeps) runs up to 2x faster when N >= K.
- MKL runs one batch-1 product on one core. Split into P products over blocks of output rows, ``torch.bmm`` (MKL's
  batched GEMM) runs them on P cores: up to 1.7x faster for large matrices, and bit-identical, since each output is
  still one dot product summed in the same order (`SplitLinear`).

The rest of a step is dispatch overhead, cut by fewer, larger kernels: one q/k/v matmul instead of three
(`fuse_qkv`), one RMSNorm kernel instead of five elementwise ops (`LayerNorm` is one kernel already), no dropout
calls. `optimize_for_decoding` does all of it in place, the way ``ipex.optimize`` does: it changes the class of
modules and the memory layout of wide weights, and lets q/k/v share one matrix; parameters, tied weights and
``state_dict`` keep their names, shapes and values, and only ``forward`` differs. Results agree with the plain
modules to float32 rounding (tests), not bit for bit: another layout is another kernel. `restore_modules` undoes it
(before training).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from companion.inference.quantize import Int8Linear, QuantizedWeight
from companion.nn.attention import MultiHeadAttention
from companion.nn.layers import RMSNorm, _compute_dtype

LinearKernel = Literal["auto", "torch"]

__all__ = ["SplitLinear", "split_product", "column_major", "FusedRMSNorm", "EvalDropout", "fuse_qkv", "fuse_int8_qkv",
           "unfuse_qkv", "optimize_for_decoding", "restore_modules"]

SPLIT_MIN_ELEMENTS = 2**16  # smaller matrices (under 256 KB in float32) gain nothing from a split


class SplitLinear(nn.Linear):
    """nn.Linear whose product with a single row (batch-1 decoding) on CPU runs as P = torch.get_num_threads()
    independent products over blocks of N / P output rows, in one ``torch.baddbmm``, so P cores share the weight
    reads. Other inputs, devices, gradients and small or indivisible matrices: nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, p = self.weight, torch.get_num_threads()
        n, k = w.shape
        if (p > 1 and n % p == 0 and x.numel() == k and w.numel() >= SPLIT_MIN_ELEMENTS and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return split_product(x, w, self.bias, p)
        return super().forward(x)


def split_product(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, p: int) -> torch.Tensor:
    """x (..., K) holding one row, times w (N, K) in any layout, plus bias: P products over blocks of N / P output
    rows in one ``torch.bmm`` / ``torch.baddbmm``; (..., N)."""
    n, k = w.shape
    blocks = w.unflatten(0, (p, n // p)).transpose(1, 2)  # (P, K, N/P) views
    rows = x.reshape(1, 1, k).expand(p, 1, k)  # (P, 1, K)
    if bias is None:
        y = torch.bmm(rows, blocks)  # (P, 1, N/P)
    else:
        y = torch.baddbmm(bias.view(p, 1, n // p), rows, blocks)  # (P, 1, N/P)
    return y.view(*x.shape[:-1], n)  # block j holds outputs j N/P .. (j + 1) N/P - 1


def column_major(w: torch.Tensor) -> torch.Tensor:
    """The same (N, K) matrix stored as its transpose (strides (1, N)): ``F.linear`` then hands BLAS a contiguous
    (K, N) W^T, the layout in which MKL's matrix-vector product runs fastest for N >= K on the reference CPU."""
    return w.t().contiguous().t()


class FusedRMSNorm(RMSNorm):
    """`companion.nn.layers.RMSNorm` computed by one ``F.rms_norm`` kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.to(_compute_dtype(x.dtype))
        return F.rms_norm(h, self.weight.shape, self.weight.to(h.dtype), self.eps).to(x.dtype)


class EvalDropout(nn.Dropout):
    """nn.Dropout that returns its input untouched, without a kernel call, in eval mode or with p = 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if not self.training or self.p == 0 else super().forward(x)


_SWAPS: dict[type, type] = {RMSNorm: FusedRMSNorm, nn.Dropout: EvalDropout}
_RESTORE: dict[type, type] = {FusedRMSNorm: RMSNorm, EvalDropout: nn.Dropout,
                              SplitLinear: nn.Linear}
_PLAIN_LINEAR = (nn.Linear, SplitLinear)


def _can_fuse(attention: MultiHeadAttention) -> bool:
    projs = (attention.q_proj, attention.k_proj, attention.v_proj)
    return (attention.config.kv_dim is None and all(type(p) in _PLAIN_LINEAR for p in projs)
            and len({p.bias is None for p in projs}) == 1)


def fuse_qkv(attention: MultiHeadAttention, linear_class: type[nn.Linear] = nn.Linear,
             layout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> bool:
    """Give a self-attention layer one (H + 2G)D x C projection for q, k and v; return whether it could.

    The fused matrix is ``cat([W_q, W_k, W_v])`` (stored as ``layout`` makes it, e.g. `column_major`), run by a
    ``linear_class``, and the three Parameters become views of it: the same objects and values (``state_dict`` and
    optimizers see no change, and an in-place update of one reaches the fused matrix), with no second copy. Not
    fused: cross-attention layers, and projections that are not plain nn.Linear (LoRA, quantized) or that differ in
    having a bias.
    """
    if not _can_fuse(attention):
        return False
    projs = (attention.q_proj, attention.k_proj, attention.v_proj)
    weight = torch.cat([p.weight.detach() for p in projs])  # ((H + 2G) D, C)
    if layout is not None:
        weight = layout(weight)
    bias = None if projs[0].bias is None else torch.cat([p.bias.detach() for p in projs])  # ((H + 2G) D,)
    start = 0
    for p in projs:  # each Parameter now looks into its rows of the fused matrix
        rows = slice(start, start + p.out_features)
        p.weight.data = weight[rows]
        if bias is not None:
            p.bias.data = bias[rows]
        start = rows.stop
    fused = linear_class.__new__(linear_class)  # an nn.Linear whose weight and bias are unsaved buffers
    nn.Module.__init__(fused)
    fused.in_features, fused.out_features = weight.shape[1], weight.shape[0]
    fused.register_buffer("weight", weight, persistent=False)
    fused.register_buffer("bias", bias, persistent=False)
    attention.fused_qkv = fused
    return True


def fuse_int8_qkv(attention: MultiHeadAttention) -> bool:
    """`fuse_qkv` for int8 projections (`companion.inference.quantize.Int8Linear`, same kernel and activation
    scheme): one int8 matrix and one scale vector, of which the three projections' buffers become views, so W8A8
    decoding runs one fbgemm call instead of three. The fused buffers are not saved. Returns whether it could."""
    projs = (attention.q_proj, attention.k_proj, attention.v_proj)
    first = projs[0]
    if (attention.config.kv_dim is not None or any(type(p) is not Int8Linear for p in projs)
            or len({(p.kernel, p.dynamic_activations, p.bias is None) for p in projs}) > 1):
        return False
    qweight = torch.cat([p.weight_q.qweight for p in projs])  # int8 ((H + 2G) D, C)
    scale = torch.cat([p.weight_q.scale for p in projs])  # ((H + 2G) D,)
    bias = None if first.bias is None else torch.cat([p.bias.detach() for p in projs])
    start = 0
    for p in projs:  # each projection now looks into its rows of the fused matrix
        rows = slice(start, start + p.out_features)
        p.weight_q.qweight, p.weight_q.scale = qweight[rows], scale[rows]
        if bias is not None:
            p.bias.data = bias[rows]
        start = rows.stop
    weight = QuantizedWeight.__new__(QuantizedWeight)  # the fused matrix, built from the int8 parts as they are
    nn.Module.__init__(weight)
    weight.bits, weight.shape, weight.group_size = 8, tuple(qweight.shape), qweight.shape[1]
    weight.register_buffer("qweight", qweight, persistent=False)
    weight.register_buffer("scale", scale, persistent=False)
    fused = Int8Linear(weight, None, first.kernel, first.dynamic_activations)
    if bias is not None:
        del fused.bias
        fused.register_buffer("bias", bias, persistent=False)
    attention.fused_qkv = fused
    return True


def unfuse_qkv(attention: MultiHeadAttention) -> None:
    """Undo `fuse_qkv`: the three projections own their weights again (copies of the current values)."""
    if attention.fused_qkv is None:
        return
    for p in (attention.q_proj, attention.k_proj, attention.v_proj):
        if isinstance(p, Int8Linear):
            p.weight_q.qweight, p.weight_q.scale = p.weight_q.qweight.clone(), p.weight_q.scale.clone()
        else:
            p.weight.data = p.weight.data.clone(memory_format=torch.contiguous_format)
        if p.bias is not None:
            p.bias.data = p.bias.data.clone()
    attention.fused_qkv = None


def optimize_for_decoding(model: nn.Module, *, linear: LinearKernel = "auto", norms: bool = True,
                          qkv: bool = True) -> nn.Module:
    """Make ``model`` decode faster in place and return it.

    ``linear``: "auto" stores every wide nn.Linear weight (out >= in) `column_major` (on CPU) and makes every
    nn.Linear a `SplitLinear`; "torch" leaves them as they are. ``norms``: RMSNorm / Dropout become `FusedRMSNorm` /
    `EvalDropout`. ``qkv``: self-attention layers get `fuse_qkv` (or `fuse_int8_qkv` for int8 projections).
    Modules of other classes (quantized or LoRA layers, subclasses) are left alone otherwise, so quantize first. Call
    it after moving the model to its device and dtype; `restore_modules` undoes it.
    """
    if linear not in ("auto", "torch"):
        raise ValueError(f"linear must be 'auto' or 'torch', got {linear!r}")

    def choose(out_features: int, in_features: int, device: torch.device) -> tuple[type[nn.Linear], bool]:
        """(class, column-major?) for one weight."""
        if linear == "torch":
            return nn.Linear, False
        return SplitLinear, device.type == "cpu" and out_features >= in_features

    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention) and m.fused_qkv is None]
    if qkv:
        for attention in attentions:
            fuse_int8_qkv(attention)
        for attention in filter(_can_fuse, attentions):
            d = attention.q_proj.weight.device
            out = attention.q_proj.out_features + attention.k_proj.out_features + attention.v_proj.out_features
            cls, wide = choose(out, attention.q_proj.in_features, d)
            fuse_qkv(attention, cls, column_major if wide else None)
    placed = _fused_modules(attentions)
    for module in model.modules():
        if type(module) is nn.Linear and module not in placed:
            cls, wide = choose(module.out_features, module.in_features, module.weight.device)
            module.__class__ = cls
            if wide and module.weight.is_contiguous():
                module.weight.data = column_major(module.weight.data)
        elif norms and type(module) in _SWAPS:
            module.__class__ = _SWAPS[type(module)]
    return model


def _fused_modules(attentions: list[MultiHeadAttention]) -> set[nn.Module]:
    """The q/k/v projections (and fused projections) whose weights `fuse_qkv` already placed."""
    return {m for a in attentions if a.fused_qkv is not None
            for m in (a.q_proj, a.k_proj, a.v_proj, a.fused_qkv)}


def restore_modules(model: nn.Module) -> nn.Module:
    """Undo `optimize_for_decoding` in place: plain nn.Linear with row-major weights, RMSNorm and
    Dropout, unfused q/k/v."""
    for module in list(model.modules()):
        if isinstance(module, MultiHeadAttention):
            unfuse_qkv(module)
    for module in model.modules():
        if type(module) in _RESTORE:
            module.__class__ = _RESTORE[type(module)]
        if type(module) is nn.Linear and not module.weight.is_contiguous():
            module.weight.data = module.weight.data.contiguous()
    return model
