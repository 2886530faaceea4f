import random

import numpy as np
import pytest
import torch

import companion
from companion.runtime import choose_device, choose_precision, seed_everything, set_threads


def _draw():
    return random.random(), np.random.rand(3).tolist(), torch.randn(4).tolist()


def test_seed_everything_reproduces_all_generators():
    seed_everything(123)
    first = _draw()
    seed_everything(123)
    assert _draw() == first
    seed_everything(124)
    assert _draw() != first


@pytest.mark.parametrize("bad", [-1, 1.5, "0", True])
def test_seed_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="seed must be a non-negative int"):
        seed_everything(bad)


def test_set_threads():
    before = torch.get_num_threads()
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="got 0"):
        set_threads(0)


def test_choose_device_cpu_and_missing_cuda():
    assert choose_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            choose_device("cuda")


def test_cpu_precision_defaults_to_fp32_without_scaler():
    p = choose_precision("cpu")
    assert (p.dtype, p.grad_scaler, p.name) == (torch.float32, False, "fp32")
    x = torch.randn(2, 3)
    with p.autocast():
        assert (x @ x.T).dtype == torch.float32


def test_cpu_bf16_autocast_computes_in_bf16():
    p = choose_precision("cpu", prefer="bf16")
    x = torch.randn(2, 3)
    with p.autocast():
        assert (x @ x.T).dtype == torch.bfloat16
    assert not p.grad_scaler


def test_precision_errors_name_the_value():
    with pytest.raises(ValueError, match="got 'fp8'"):
        choose_precision("cpu", prefer="fp8")
    with pytest.raises(ValueError, match="fp16 autocast on the CPU"):
        choose_precision("cpu", prefer="fp16")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_precision_follows_hardware():
    p = choose_precision("cuda")
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    assert p.dtype == expected and p.grad_scaler == (expected == torch.float16)


def test_setup_notebook_fixes_threads_and_determinism():
    before = torch.get_num_threads()
    try:
        companion.setup_notebook(seed=0, threads=1)
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
        a = torch.randn(3)
        companion.setup_notebook(seed=0, threads=1)
        assert torch.equal(a, torch.randn(3))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(before)


def test_environment_report_has_versions():
    report = companion.environment_report()
    assert report["torch"] == torch.__version__
    assert report["device"] in {"cpu", "cuda", "mps"}
