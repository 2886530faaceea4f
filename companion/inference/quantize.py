"""Weight quantization written from scratch: int8 per output channel, int4 per group (two values per byte).

int8 is symmetric absmax per output channel (scale = max|w| / 127, as LLM.int8()'s vector-wise scheme,
Dettmers et al. 2022, without its outlier decomposition); int4 is asymmetric min/max per group of
``group_size`` input columns (scale = (max - min) / 15, zero = min), because a group's weights are rarely
centred and 16 levels are too few to waste one half of them (the layout GPTQ/AWQ kernels use too).
Modules keep packed weights and scales as buffers, so ``state_dict`` (and a safetensors file) has the real
saved size. Kernels: W8A8 (``dynamic_activations``: each token's activations quantized on every call, with the
scheme ``torch.ao.quantization.quantize_dynamic`` applies to a whole tensor) runs fbgemm's int8 kernel with our
weights for a single token, ``torch._int_mm`` for several;
weight-only runs ``torch._weight_int8pack_mm`` / ``torch._weight_int4pack_mm_for_cpu`` (dequantization fused into
the matmul), or dequantize-then-``F.linear``, the reference. "auto" picks the integer kernel for W8A8 and dequantize
for weight-only: on the book's reference CPU (AMD EPYC, torch 2.13), at batch 1 with the weights in DRAM, fbgemm's
kernel ran 1.4-8x faster than MKL's float32 product (the larger the matrix, the more), while the fused weight-only
kernels ran slower than float32 (benchmarks/quantize.py times whole models).
"""

from __future__ import annotations

import fnmatch
import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Kernel = Literal["auto", "fused", "dequantize"]

HAS_INT8PACK = hasattr(torch, "_weight_int8pack_mm")
HAS_INT4PACK = hasattr(torch, "_convert_weight_to_int4pack_for_cpu") and hasattr(torch, "_weight_int4pack_mm_for_cpu")
HAS_INT_MM = hasattr(torch, "_int_mm")
HAS_DYNAMIC_LINEAR = torch.backends.quantized.engine != "none" and hasattr(torch.ops.quantized, "linear_dynamic")
INT4_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes torch's int4 CPU kernel accepts


@dataclass(frozen=True)
class QuantConfig:
    """What `quantize_model` does. ``QuantConfig(bits=4, group_size=128)`` is the usual int4 setting."""

    bits: int = 8  # 8: symmetric per output channel; 4: asymmetric per group, two values per byte
    group_size: int = 128  # int4 only: input columns sharing one scale and zero (must divide in_features)
    embeddings: bool = True  # also quantize nn.Embedding tables (a tied LM head stays tied, quantized once)
    skip: tuple[str, ...] = ()  # fnmatch patterns of module names left in float, e.g. ("lm_head",)
    kernel: Kernel = "auto"  # "fused": torch's int kernels; "dequantize": reference; "auto": see module docstring
    dynamic_activations: bool = False  # int8 only: quantize each input row to int8 too (W8A8 via torch._int_mm)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {self.bits!r}")
        if self.group_size < 2 or self.group_size % 2:
            raise ValueError(f"group_size must be an even number >= 2, got {self.group_size!r}")
        if self.kernel not in ("auto", "fused", "dequantize"):
            raise ValueError(f"kernel must be 'auto', 'fused' or 'dequantize', got {self.kernel!r}")
        if self.dynamic_activations and self.bits != 8:
            raise ValueError(f"dynamic_activations needs bits=8, got bits={self.bits!r}")


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> int8 (N, K) and scale (N,): w ~ q * scale, |w - q * scale| <= scale / 2."""
    scale = w.detach().abs().amax(dim=1).float() / 127  # (N,)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row quantizes to zeros
    q = torch.round(w.detach().float() / scale[:, None]).clamp(-127, 127).to(torch.int8)  # (N, K)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q * scale[..., None]  # (N, K) in scale's dtype; type promotion converts q inside one kernel


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., K) integers in 0..15 -> uint8 (..., K/2): column 2j in the low nibble, 2j+1 in the high one."""
    if q.shape[-1] % 2:
        raise ValueError(f"int4 packing needs an even last dimension, got shape {tuple(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 15):
        raise ValueError(f"int4 values must lie in 0..15, got range {int(q.min())}..{int(q.max())}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)  # (..., K/2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., K/2) -> uint8 (..., K) in 0..15 (inverse of `pack_int4`)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)  # (..., K)


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float -> packed uint8 (N, K/2), scale and zero (N, K/g): w ~ q * scale + zero per group."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"group_size {group_size} must divide in_features, got in_features={k}")
    wg = w.detach().float().view(n, k // group_size, group_size)  # (N, K/g, g)
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)  # (N, K/g)
    scale = (hi - lo) / 15
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group is stored exactly in zero
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)  # (N, K/g, g)
    return pack_int4(q.view(n, k)), scale, lo


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """q * scale + zero per group, in scale's dtype: (..., K/2) packed, (..., K/g) scale and zero -> (..., K)."""
    lead, half, n_groups = packed.shape[:-1], packed.shape[-1], scale.shape[-1]
    q = torch.empty(*lead, half, 2, dtype=scale.dtype, device=packed.device)  # unpacked straight into floats
    q[..., 0], q[..., 1] = packed & 15, packed >> 4
    qg = q.view(*lead, n_groups, 2 * half // n_groups)  # (..., K/g, g)
    return qg.mul_(scale[..., None]).add_(zero[..., None]).view(*lead, 2 * half)  # (..., K)


class QuantizedWeight(nn.Module):
    """Buffers of one quantized (N, K) matrix: ``qweight`` (int8 (N, K) or packed uint8 (N, K/2)), ``scale``,
    and for int4 ``zero``. Shared by a tied embedding and LM head, so it is stored once."""

    def __init__(self, w: torch.Tensor, bits: int, group_size: int = 128) -> None:
        super().__init__()
        self.bits, self.shape = bits, tuple(w.shape)
        if bits == 8:
            q, scale = quantize_int8(w)
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)
            self.group_size = w.shape[1]
        else:
            packed, scale, zero = quantize_int4(w, group_size)
            self.register_buffer("qweight", packed)
            self.register_buffer("scale", scale)
            self.register_buffer("zero", zero)
            self.group_size = group_size

    def dequantize(self) -> torch.Tensor:
        """The float (N, K) matrix the quantized one stands for."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scale)
        return dequantize_int4(self.qweight, self.scale, self.zero)

    def rows(self, idx: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``idx`` (...) -> (..., K), without dequantizing the whole table."""
        if self.bits == 8:
            return dequantize_int8(self.qweight[idx], self.scale[idx])
        return dequantize_int4(self.qweight[idx], self.scale[idx], self.zero[idx])


class _QuantizedLinear(nn.Module):
    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, kernel: Kernel) -> None:
        super().__init__()
        self.weight_q = weight
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.kernel = kernel

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.weight_q.bits}, "
                f"group_size={self.weight_q.group_size}, kernel={self.kernel}")

    def _fused(self, x2d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "dequantize" or x.dtype != torch.float32:
            return F.linear(x, self.weight_q.dequantize().to(x.dtype), self.bias)
        y = self._fused(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)  # (..., N)
        return y if self.bias is None else y + self.bias


class Int8Linear(_QuantizedLinear):
    """y = x W^T + b with W int8 per output channel. ``dynamic_activations`` (W8A8): each row (token) of x is quantized
    too, on every call (`quantize_activations`), and multiplied in integers. A single row, as in batch-1 decoding,
    runs fbgemm's int8 kernel (``torch.ops.quantized.linear_dynamic``, the kernel of quantize_dynamic, here with our
    per-channel weights), whose per-tensor activation scheme is exactly ours for one row; several rows, or an
    engine without fbgemm, run ``torch._int_mm`` with each row's zero point corrected. Per row, not per tensor as
    quantize_dynamic does it for a whole prompt: one token with huge activations (Llama's first token) would
    otherwise set the step size of every other token."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None, kernel: Kernel = "auto",
                 dynamic_activations: bool = False) -> None:
        if weight.bits != 8:
            raise ValueError(f"Int8Linear needs an 8-bit weight, got bits={weight.bits}")
        available = HAS_INT_MM if dynamic_activations else HAS_INT8PACK
        fused = available and (kernel == "fused" or (kernel == "auto" and dynamic_activations))
        super().__init__(weight, bias, "fused" if fused else "dequantize")
        self.dynamic_activations = dynamic_activations
        self._packed: tuple | None = None  # (weight identity, fbgemm's packed weight), made on first use

    @classmethod
    def from_linear(cls, linear: nn.Linear, kernel: Kernel = "auto", dynamic_activations: bool = False) -> Int8Linear:
        return cls(QuantizedWeight(linear.weight, 8), linear.bias, kernel, dynamic_activations)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_packed"] = None  # fbgemm's packed weight is a C++ object: copies and pickles pack again
        return state

    def _fbgemm_weight(self):
        """fbgemm's packed copy of qweight and bias (None where the quantized engine cannot run it), packed again
        whenever the weight, its scales or the bias change."""
        w, b = self.weight_q, self.bias
        key = (id(w.qweight), w.qweight._version, id(w.scale), w.scale._version, id(b), None if b is None else b._version)
        if self._packed is None or self._packed[0] != key:
            packed = None
            if HAS_DYNAMIC_LINEAR and w.qweight.device.type == "cpu":
                with warnings.catch_warnings():  # quantized tensors are deprecated, their kernels are not
                    warnings.simplefilter("ignore", UserWarning)
                    qw = torch._make_per_channel_quantized_tensor(w.qweight, w.scale.double(),
                                                                  torch.zeros_like(w.scale, dtype=torch.long), 0)
                try:
                    packed = torch.ops.quantized.linear_prepack(qw, None if self.bias is None else self.bias.detach())
                except RuntimeError:  # an engine without per-channel dynamic linear
                    packed = None
            self._packed = (key, packed)
        return self._packed[1]

    def _fused(self, x2d: torch.Tensor) -> torch.Tensor:
        w = self.weight_q
        if not self.dynamic_activations:
            return torch._weight_int8pack_mm(x2d.contiguous(), w.qweight, w.scale)  # (M, N)
        xs, xz, xq = quantize_activations(x2d)  # (M, 1), (M, 1), int8 (M, K) in 0..127
        colsum = w.qweight.sum(dim=1, dtype=torch.int32)  # (N,) the zero point's share of each dot product
        return (torch._int_mm(xq, w.qweight.t()) - xz * colsum).float() * xs * w.scale  # (M, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        integer = self.dynamic_activations and self.kernel == "fused" and x.dtype == torch.float32
        if integer and x.numel() == x.shape[-1]:
            packed = self._fbgemm_weight()
            if packed is not None:  # the bias is added inside the kernel, which takes (..., K) inputs
                return torch.ops.quantized.linear_dynamic(x, packed, True)  # (..., N)
        if integer and not int_mm_is_exact():
            integer = False  # the same W8A8 product, on the reference path
        if self.dynamic_activations and not integer:
            xs, xz, xq = quantize_activations(x.reshape(-1, self.in_features))  # reference W8A8 product, x's dtype
            w = self.weight_q.dequantize().to(x.dtype)
            y = F.linear((xq.to(x.dtype) - xz) * xs, w).view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias
        return super().forward(x)


@functools.cache
def int_mm_is_exact() -> bool:
    """Whether ``torch._int_mm`` gives exact integer sums here, checked once on a small product. With torch 2.13 and
    oneDNN held to AVX2 or SSE4.1 (``ONEDNN_MAX_CPU_ISA``, as CI simulates an older CPU) it returns wrong sums, so
    W8A8 then computes the same product on its float reference path."""
    if not HAS_INT_MM:
        return False
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (17, 64), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (64, 24), dtype=torch.int8, generator=g)
    return torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long())


def quantize_activations(x: torch.Tensor, qmax: int = 127) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dynamic activation quantization of each row (last dimension) as quantize_dynamic's fbgemm kernel quantizes a
    tensor: an asymmetric scale and zero point mapping [min(row, 0), max(row, 0)] onto the integers 0..qmax. qmax =
    127 (7 bits) is torch.ao's ``reduce_range`` on x86: it keeps the sum of two uint8 x int8 products, which AVX2
    computes in 16 bits, from saturating. Returns scale (..., 1), zero point (..., 1) and int8 integers in 0..qmax:
    x ~ (q - zero) * scale."""
    lo, hi = x.amin(dim=-1, keepdim=True).clamp(max=0), x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 0.1))  # an all-zero row: fbgemm's choice
    zero = torch.round(-lo / scale).clamp(0, qmax)  # 0.0 is represented exactly
    q = torch.round(x / scale + zero).clamp(0, qmax).to(torch.int8)
    return scale, zero.to(torch.int32), q


class Int4Linear(_QuantizedLinear):
    """y = x W^T + b with W int4 per group; the fused kernel keeps its own tile layout as a non-persistent
    buffer (same bytes in memory as the packed weight, not saved)."""

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None, kernel: Kernel = "auto") -> None:
        if weight.bits != 4:
            raise ValueError(f"Int4Linear needs a 4-bit weight, got bits={weight.bits}")
        fused = (kernel == "fused" and HAS_INT4PACK and weight.group_size in INT4_KERNEL_GROUPS
                 and weight.shape[0] % 16 == 0)  # the CPU kernel's tiles hold 16 output rows
        super().__init__(weight, bias, "fused" if fused else "dequantize")
        if fused:
            q = unpack_int4(weight.qweight).to(torch.int32)  # (N, K)
            self.register_buffer("_tiles", torch._convert_weight_to_int4pack_for_cpu(q, 1), persistent=False)
            # the kernel computes (q - 8) * scale + zero8, so zero8 = zero + 8 * scale; (K/g, N, 2)
            sz = torch.stack([weight.scale.t(), (weight.zero + 8 * weight.scale).t()], dim=-1)
            self.register_buffer("_scales_zeros", sz.contiguous(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, kernel: Kernel = "auto") -> Int4Linear:
        return cls(QuantizedWeight(linear.weight, 4, group_size), linear.bias, kernel)

    def _fused(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(x2d.contiguous(), self._tiles, self.weight_q.group_size,
                                                 self._scales_zeros)  # (M, N)


class QuantizedEmbedding(nn.Module):
    """An embedding table stored quantized; a lookup dequantizes only the rows it reads."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.weight_q = weight
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight_q.rows(idx)  # (..., C)


class Int8Embedding(QuantizedEmbedding):
    """int8 table, one scale per row (per token)."""


class Int4Embedding(QuantizedEmbedding):
    """int4 table, one scale and zero per group of ``group_size`` columns of each row."""


def quantize_model(model: nn.Module, config: QuantConfig = QuantConfig()) -> nn.Module:
    """Replace every nn.Linear (and nn.Embedding if ``config.embeddings``) of ``model`` in place and return it.
    A weight shared by several modules (tied embedding and LM head) is quantized once and shared."""
    targets = [(name, m) for name, m in model.named_modules()
               if (type(m) is nn.Linear or (config.embeddings and type(m) is nn.Embedding))
               and not any(fnmatch.fnmatchcase(name, p) for p in config.skip)]
    if config.bits == 4:
        bad = [(name, m.weight.shape[1]) for name, m in targets if m.weight.shape[1] % config.group_size]
        if bad:
            raise ValueError(f"group_size {config.group_size} must divide the input width of every quantized "
                             f"module, got {bad[:3]} (skip them or choose another group_size)")
    shared: dict[int, QuantizedWeight] = {}
    for name, m in targets:
        qw = shared.get(id(m.weight))
        if qw is None:
            qw = shared[id(m.weight)] = QuantizedWeight(m.weight, config.bits, config.group_size)
        if isinstance(m, nn.Embedding):
            new: nn.Module = (Int8Embedding if config.bits == 8 else Int4Embedding)(qw)
        elif config.bits == 8:
            new = Int8Linear(qw, m.bias, config.kernel, config.dynamic_activations)
        else:
            new = Int4Linear(qw, m.bias, config.kernel)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def dequantize_model(model: nn.Module) -> nn.Module:
    """Replace quantized modules by float nn.Linear / nn.Embedding holding the dequantized weights (in place),
    keeping shared weights shared: the float model whose outputs the quantized one approximates."""
    shared: dict[int, nn.Parameter] = {}
    for name, m in list(model.named_modules()):
        if not isinstance(m, (_QuantizedLinear, QuantizedEmbedding)):
            continue
        w = shared.get(id(m.weight_q))
        if w is None:
            w = shared[id(m.weight_q)] = nn.Parameter(m.weight_q.dequantize())
        if isinstance(m, QuantizedEmbedding):
            new: nn.Module = nn.Embedding(*w.shape)
        else:
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            if m.bias is not None:
                new.bias = nn.Parameter(m.bias.detach().clone())
        new.weight = w
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the distinct tensors in ``model.state_dict()`` (shared storage counted once): the payload of a
    safetensors / torch.save file, without its small header."""
    seen: dict[tuple[int, int], int] = {}
    for t in model.state_dict().values():
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        seen[key] = max(seen.get(key, 0), t.numel() * t.element_size())
    return sum(seen.values())


def snr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-noise ratio 10 log10(sum ref^2 / sum (ref - approx)^2) in dB (float64)."""
    ref = reference.detach().double()
    err = ref - approx.detach().double()
    return float(10 * torch.log10(ref.pow(2).sum() / err.pow(2).sum().clamp(min=1e-300)))
