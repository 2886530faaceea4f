"""Training throughput and model FLOPs utilisation (MFU).

MFU follows PaLM (Chowdhery et al., 2022, "PaLM: Scaling Language Modeling with Pathways", Appendix B): the tokens per
second a run achieves times the model FLOPs one token needs (forward + backward, no rematerialisation), divided by the
peak FLOP/s of the hardware. PaLM's 6N + 12 L H Q T per token counts attention against all T keys, as
`companion.scaling.flops_per_token(config, head=True, full_attention=True)` does. The peak is either a vendor
datasheet's dense figure (`GPU_PEAK_FLOPS`) or what a large matmul achieves here (`measure_matmul_peak`, the honest
denominator on a CPU, which has no datasheet figure for our thread count).
"""

from __future__ import annotations

import math
import re
import statistics
import time
from collections.abc import Callable

import torch

TFLOPS = 1e12

# Dense peak FLOP/s per precision from the vendor datasheets; their "with sparsity" figures are twice these. "fp32" is
# the CUDA cores (PyTorch's default matmul), "tf32" the tensor cores fed fp32 (torch.backends.cuda.matmul.allow_tf32).
# No "bf16" where the GPU has no bfloat16 tensor cores (T4, V100: see companion.runtime.cuda_has_native_bf16).
GPU_PEAK_FLOPS: dict[str, dict[str, float]] = {
    # NVIDIA T4 Tensor Core GPU datasheet: FP32 8.1 TFLOPS, mixed-precision FP16/FP32 65 TFLOPS.
    "T4": {"fp32": 8.1 * TFLOPS, "fp16": 65 * TFLOPS},
    # NVIDIA V100 Tensor Core GPU datasheet: SXM2 FP32 15.7, Tensor 125; PCIe FP32 14, Tensor 112 TFLOPS.
    "V100 SXM2": {"fp32": 15.7 * TFLOPS, "fp16": 125 * TFLOPS},
    "V100 PCIe": {"fp32": 14 * TFLOPS, "fp16": 112 * TFLOPS},
    # NVIDIA A100 Tensor Core GPU datasheet (SXM and PCIe alike): FP32 19.5, TF32 156, BF16/FP16 312 TFLOPS.
    "A100": {"fp32": 19.5 * TFLOPS, "tf32": 156 * TFLOPS, "bf16": 312 * TFLOPS, "fp16": 312 * TFLOPS},
    # NVIDIA L4 Tensor Core GPU datasheet: FP32 30.3, TF32 120*, BF16/FP16 242* TFLOPS (* with sparsity).
    "L4": {"fp32": 30.3 * TFLOPS, "tf32": 60 * TFLOPS, "bf16": 121 * TFLOPS, "fp16": 121 * TFLOPS},
    # NVIDIA H100 Tensor Core GPU datasheet: SXM FP32 67, TF32 989*, BF16/FP16 1,979*; PCIe FP32 51, TF32 756*,
    # BF16/FP16 1,513*; NVL FP32 60, TF32 835*, BF16/FP16 1,671* TFLOPS (* with sparsity).
    "H100 SXM": {"fp32": 67 * TFLOPS, "tf32": 494.5 * TFLOPS, "bf16": 989 * TFLOPS, "fp16": 989 * TFLOPS},
    "H100 PCIe": {"fp32": 51 * TFLOPS, "tf32": 378 * TFLOPS, "bf16": 756 * TFLOPS, "fp16": 756 * TFLOPS},
    "H100 NVL": {"fp32": 60 * TFLOPS, "tf32": 417.5 * TFLOPS, "bf16": 835.5 * TFLOPS, "fp16": 835.5 * TFLOPS},
    # NVIDIA H200 Tensor Core GPU datasheet: H200 SXM has H100 SXM's compute (more and faster memory); H200 NVL
    # H100 NVL's.
    "H200 SXM": {"fp32": 67 * TFLOPS, "tf32": 494.5 * TFLOPS, "bf16": 989 * TFLOPS, "fp16": 989 * TFLOPS},
    "H200 NVL": {"fp32": 60 * TFLOPS, "tf32": 417.5 * TFLOPS, "bf16": 835.5 * TFLOPS, "fp16": 835.5 * TFLOPS},
}

# torch.cuda.get_device_name() -> table row, tried in order (the more specific first): e.g. "Tesla T4",
# "Tesla V100-SXM2-16GB", "NVIDIA A100-SXM4-80GB", "NVIDIA L4" (not "NVIDIA L40S"), "NVIDIA H100 80GB HBM3" (SXM),
# "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA H200 NVL".
_NAME_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"\bT4\b", "T4"),
    (r"\bV100-SXM2\b", "V100 SXM2"),
    (r"\bV100-PCIE\b", "V100 PCIe"),
    (r"\bA100\b", "A100"),
    (r"\bL4\b", "L4"),
    (r"\bH100 NVL\b", "H100 NVL"),
    (r"\bH100 PCIe\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),
    (r"\bH200 NVL\b", "H200 NVL"),
    (r"\bH200\b", "H200 SXM"),
)


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


def _positive_int(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def mfu(tokens_per_second: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s (tokens/s * FLOPs per token) over ``peak_flops``.

    Not capped at 1: a value above 1 means the peak or the FLOPs per token are wrong for this run.
    """
    achieved = _positive("tokens_per_second", tokens_per_second) * _positive("flops_per_token", flops_per_token)
    return achieved / _positive("peak_flops", peak_flops)


def gpu_model(name: str | None = None) -> str:
    """The `GPU_PEAK_FLOPS` row for a CUDA device name (default: ``torch.cuda.get_device_name()``)."""
    if name is None:
        name = torch.cuda.get_device_name()
    for pattern, row in _NAME_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return row
    raise ValueError(f"no datasheet peak for GPU {name!r}; known: {', '.join(GPU_PEAK_FLOPS)}")


def gpu_peak_flops(precision: str, name: str | None = None) -> float:
    """Dense datasheet peak FLOP/s of the GPU called ``name`` (default: this one) in ``precision``
    ("fp32", "tf32", "bf16", "fp16"; the names of `companion.runtime.Precision`)."""
    row = gpu_model(name)
    peaks = GPU_PEAK_FLOPS[row]
    if precision not in peaks:
        raise ValueError(f"{row} has no {precision!r} peak (no such tensor cores); it has {', '.join(peaks)}")
    return peaks[precision]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 10,
                        device: torch.device | str = "cpu") -> float:
    """Achievable FLOP/s of an (n, n) @ (n, n) matmul in ``dtype`` on ``device`` with the current thread count:
    2 n^3 FLOPs over the fastest of ``repeats`` timed calls (after one warm-up call)."""
    _positive_int("n", n)
    _positive_int("repeats", repeats)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=generator).to(dtype)  # (n, n)
    b = torch.randn(n, n, device=device, generator=generator).to(dtype)  # (n, n)
    a @ b  # warm-up: kernel selection, thread pool start
    best = math.inf
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / max(best, 1e-9)


def measure_throughput(step_fn: Callable[[], object], tokens_per_step: int, warmup: int = 2, repeats: int = 5,
                       device: torch.device | str = "cpu") -> float:
    """Median tokens/s of ``step_fn()`` (one full training step of ``tokens_per_step`` tokens) over ``repeats`` timed
    calls, after ``warmup`` untimed ones (allocations, autocast caches, lazy optimizer state). On CUDA the device is
    synchronised around every call, so each time covers the step's kernels, not just their launch."""
    _positive_int("tokens_per_step", tokens_per_step)
    _positive_int("warmup", warmup, minimum=0)
    _positive_int("repeats", repeats)
    device = torch.device(device)
    for _ in range(warmup):
        step_fn()
    rates = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        step_fn()
        _synchronize(device)
        rates.append(tokens_per_step / max(time.perf_counter() - start, 1e-9))
    return statistics.median(rates)
