"""Reproducible runtime: seeds, thread count, deterministic kernels, device and precision choice.

Everything a notebook or a training run needs to give the same numbers twice is set here, once.
The precision helper follows nanoGPT's single ``ctx``: callers get a device, an autocast context and
whether a ``GradScaler`` is needed, and nothing else in the package branches on dtype.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch

DEFAULT_SEED = 0
DEFAULT_THREADS = 2  # what CI has; fixing it keeps float reductions identical across machines


def seed_everything(seed: int = DEFAULT_SEED) -> None:
    """Seed Python's, NumPy's and PyTorch's (CPU and every CUDA device) random generators."""
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds all CUDA devices


def set_threads(n: int = DEFAULT_THREADS) -> None:
    """Fix the number of intra-op CPU threads (results of parallel reductions depend on it)."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be a positive int, got {n!r}")
    torch.set_num_threads(n)


def set_deterministic(enabled: bool = True) -> None:
    """Ask PyTorch for deterministic kernels; on CUDA this also needs a fixed cuBLAS workspace."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled)
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled


def choose_device(prefer: str | None = None) -> torch.device:
    """Return ``prefer`` if given (validated), else CUDA if available, else Apple MPS, else CPU."""
    if prefer is not None:
        device = torch.device(prefer)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {prefer!r} was requested but CUDA is not available")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@dataclass(frozen=True)
class Precision:
    """How to run a model: where, in which autocast dtype, and whether the loss needs scaling."""

    device: torch.device  # where tensors live
    dtype: torch.dtype  # compute dtype inside autocast (float32 = no autocast)
    grad_scaler: bool  # True for float16 training, whose small gradients underflow without loss scaling

    def autocast(self) -> contextlib.AbstractContextManager:
        """Context manager for the forward pass (a no-op for float32)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def choose_precision(device: torch.device | str | None = None, prefer: str | None = None) -> Precision:
    """Pick the training precision for ``device``.

    CUDA with bfloat16 support (Ampere and newer: A100, H100, L4) -> bf16; older CUDA (T4, V100) -> fp16
    with a GradScaler; CPU and MPS -> fp32. ``prefer`` ("fp32", "bf16", "fp16") overrides the choice.
    """
    device = choose_device(None if device is None else str(device))
    if prefer is not None:
        if prefer not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {prefer!r}")
        dtype = _DTYPES[prefer]
        if dtype == torch.float16 and device.type == "cpu":
            raise ValueError("fp16 autocast on the CPU is slow and unsupported here; use 'bf16' or 'fp32'")
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    return Precision(device=device, dtype=dtype, grad_scaler=dtype == torch.float16)


def quiet() -> None:
    """Keep progress bars, hub look-ups and library chatter out of notebook output."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm.auto without ipywidgets
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def setup_notebook(seed: int = DEFAULT_SEED, threads: int = DEFAULT_THREADS) -> None:
    """The one call every notebook makes after its setup cell: quiet, seeded, fixed threads,
    deterministic kernels, and matplotlib with a CJK-capable font."""
    from companion.plotting import use_book_style

    quiet()
    seed_everything(seed)
    set_threads(threads)
    set_deterministic(True)
    use_book_style()


def environment_report() -> dict[str, str]:
    """Versions and hardware facts worth printing at the top of a run."""
    device = choose_device()
    report = {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": str(device),
        "threads": str(torch.get_num_threads()),
        "deterministic": str(torch.are_deterministic_algorithms_enabled()),
    }
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    return report
