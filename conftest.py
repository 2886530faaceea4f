"""Shared pytest configuration (unit tests and nbval): report which CPU kernels torch runs, and refuse to run
when a simulated foreign CPU (``ATEN_CPU_CAPABILITY``) was asked for but torch did not take it."""

import os

import pytest
import torch


def _capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


def pytest_configure(config):
    wanted = os.environ.get("ATEN_CPU_CAPABILITY")
    if wanted and _capability().lower() != wanted.lower():
        raise pytest.UsageError(f"ATEN_CPU_CAPABILITY={wanted!r} was set but torch reports {_capability()!r}: "
                                "the foreign-CPU run would test the native kernels")


def pytest_report_header(config):
    simulated = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA")
                 if k in os.environ}
    return f"torch {torch.__version__}, CPU capability {_capability()}" + (f" (simulated: {simulated})" if simulated else "")
