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
from pathlib import Path

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

    def describe(self) -> str:
        """One line for logs, e.g. "bf16 autocast on cuda", "fp16 autocast + GradScaler on cuda:0", "fp32 on cpu"."""
        how = "" if self.dtype == torch.float32 else " autocast" + (" + GradScaler" if self.grad_scaler else "")
        return f"{self.name}{how} on {self.device}"


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(_DTYPES)  # the names choose_precision(prefer=...) accepts
CUDA_BF16_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA GPUs whose tensor cores compute in bfloat16
_CPU_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # x86 AVX512-BF16, AMX-BF16; ARM FEAT_BF16 ("bf16")


def cuda_has_native_bf16(device: torch.device | str | None = None) -> bool:
    """Whether the CUDA ``device`` computes bfloat16 in hardware: compute capability >= 8.0 (A100, A10, L4, H100).

    Not ``torch.cuda.is_bf16_supported()``: with its default ``including_emulation=True`` it also answers True on a
    T4 (7.5) or V100 (7.0), where bfloat16 runs emulated, far slower than their float16 tensor cores.
    """
    return tuple(torch.cuda.get_device_capability(device)) >= CUDA_BF16_CAPABILITY


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bfloat16 instructions (x86 AVX512-BF16 or AMX-BF16, ARM BF16).

    Read from the ``flags`` (x86) or ``Features`` (ARM) lines of ``cpuinfo``; where that file does not exist (macOS,
    Windows) from PyTorch's own x86 probe, else False. (``torch.backends.cpu.get_cpu_capability()`` names the kernel
    family ATen dispatches to, e.g. "AVX512", which does not say whether bfloat16 instructions exist.)
    """
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(probe()) if probe is not None else False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & _CPU_BF16_FLAGS)


def choose_precision(device: torch.device | str | None = None, prefer: str | None = None) -> Precision:
    """Pick the training precision for ``device``.

    CUDA: bf16 when the compute capability is at least 8.0 (Ampere and newer: A100 8.0, A10 8.6, L4 8.9, H100 9.0),
    else fp16 with a GradScaler (V100 7.0, T4 7.5); see :func:`cuda_has_native_bf16` for why the capability decides.
    CPU: bf16 autocast when the CPU has bfloat16 instructions (:func:`cpu_has_native_bf16`; our GPT trains about 2x
    faster than in fp32 there) *and* deterministic algorithms are off; fp32 otherwise. Deterministic algorithms are
    the sign of a run that must reproduce: :func:`companion.setup_notebook` turns them on, so every notebook gets fp32
    on every CPU (a bf16 run on one CPU and an fp32 run on another would print different numbers), while
    ``python -m companion train`` on a bf16-capable CPU gets bf16. MPS: fp32.
    ``prefer`` ("fp32", "bf16", "fp16") overrides the choice; fp16 on the CPU is refused.
    """
    device = choose_device(None if device is None else str(device))
    if prefer is not None:
        if prefer not in _DTYPES:
            raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {prefer!r}")
        dtype = _DTYPES[prefer]
        if dtype == torch.float16 and device.type == "cpu":
            raise ValueError("fp16 autocast on the CPU is slow and unsupported here; use 'bf16' or 'fp32'")
    elif device.type == "cuda":
        dtype = torch.bfloat16 if cuda_has_native_bf16(device) else torch.float16
    elif device.type == "cpu" and not torch.are_deterministic_algorithms_enabled() and cpu_has_native_bf16():
        dtype = torch.bfloat16
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
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None and os.environ.get("TQDM_DISABLE") == "1" and not getattr(tqdm.tqdm, "_book_quiet", False):
        # tqdm reads TQDM_DISABLE when it is imported; when something imported it earlier (datasets, via
        # companion.data), make disable=True the default of every bar (tqdm.auto's classes subclass tqdm.tqdm)
        import functools

        tqdm.tqdm.__init__ = functools.partialmethod(tqdm.tqdm.__init__, disable=True)
        tqdm.tqdm._book_quiet = True


def setup_notebook(seed: int = DEFAULT_SEED, threads: int = DEFAULT_THREADS) -> None:
    """The one call every notebook makes after its setup cell: quiet, seeded, fixed threads,
    deterministic kernels, and matplotlib with a CJK-capable font."""
    from companion.plotting import use_book_style

    quiet()
    seed_everything(seed)
    set_threads(threads)
    set_deterministic(True)
    use_book_style()


def show_source(obj: object) -> object:
    """The package's own source of a function, method or class, for a notebook cell to display.

    Book pages include the code they explain from the package (never a hand copy), so page and package cannot
    drift apart. Returns an IPython ``Code`` object: highlighted in HTML, the plain source as text.
    """
    import inspect
    import textwrap

    from IPython.display import Code

    try:
        source = inspect.getsource(obj)
    except (TypeError, OSError) as error:
        raise TypeError(f"show_source needs a Python function, method or class, got {obj!r}: {error}") from None
    return Code(textwrap.dedent(source), language="python")


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
