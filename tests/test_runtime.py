import random

import numpy as np
import pytest
import torch

import companion
import companion.runtime as runtime
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


def _fake_cuda(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """A CUDA machine as torch.cuda reports it; is_bf16_supported answers True as on every recent GPU, T4 included
    (its default including_emulation=True)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("name, capability, expected", [
    ("Tesla T4", (7, 5), "fp16"),
    ("Tesla V100-SXM2-16GB", (7, 0), "fp16"),
    ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16"),
    ("NVIDIA L4", (8, 9), "bf16"),
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16"),
], ids=["T4", "V100", "A100", "L4", "H100"])
def test_cuda_precision_follows_compute_capability(monkeypatch, name, capability, expected):
    _fake_cuda(monkeypatch, name, capability)
    for device in (None, "cuda", "cuda:0"):
        p = choose_precision(device)
        assert p.device.type == "cuda"
        assert (p.name, p.grad_scaler) == (expected, expected == "fp16"), name  # fp16 needs loss scaling
    assert runtime.cuda_has_native_bf16() == (expected == "bf16")
    assert choose_precision("cuda", prefer="fp32").name == "fp32"  # prefer still overrides


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse sse2 avx avx2 fma avx512f avx512bw avx512vl{extra}
"""
ARM_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp{extra}
CPU implementer\t: 0x41
"""


@pytest.mark.parametrize("text, native", [
    (X86_CPUINFO.format(extra=""), False),  # AVX-512 without its BF16 extension (Skylake-SP)
    (X86_CPUINFO.format(extra=" avx512_bf16"), True),  # Cooper Lake, Zen 4
    (X86_CPUINFO.format(extra=" amx_bf16 amx_tile"), True),  # Sapphire Rapids
    (ARM_CPUINFO.format(extra=""), False),  # Neoverse N1
    (ARM_CPUINFO.format(extra=" bf16 i8mm"), True),  # Neoverse V1/N2, Graviton 3
], ids=["avx512", "avx512_bf16", "amx", "arm", "arm_bf16"])
def test_cpu_bf16_capability_is_queryable_but_cpu_stays_fp32(tmp_path, monkeypatch, text, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert runtime.cpu_has_native_bf16(cpuinfo) is native
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda cpuinfo="/proc/cpuinfo": native)
    p = choose_precision("cpu")  # the default does not depend on the CPU: notebooks reproduce on every CPU
    assert (p.name, p.grad_scaler) == ("fp32", False)
    assert choose_precision("cpu", prefer="bf16").name == "bf16"  # allowed either way


@pytest.mark.parametrize("probe", [True, False])
def test_cpu_bf16_without_cpuinfo_asks_torch(tmp_path, monkeypatch, probe):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: probe, raising=False)
    assert runtime.cpu_has_native_bf16(tmp_path / "missing") is probe


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_precision_follows_hardware():
    p = choose_precision("cuda")
    expected = torch.bfloat16 if torch.cuda.get_device_capability() >= (8, 0) else torch.float16
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
