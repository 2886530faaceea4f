"""Launch a command under ``torchrun --standalone`` for the distributed tests (CPU/gloo and GPU/NCCL alike)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run_torchrun(args: list[str], cwd: Path, nproc: int = 2, timeout: int = 120) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc *args``; fails the test on a non-zero exit or a time-out."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # a session of its own, so that a hung rendezvous is killed with all of torchrun's workers, not only torchrun
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(f"torchrun {' '.join(args)} did not finish within {timeout} s: {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-3000:]
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
