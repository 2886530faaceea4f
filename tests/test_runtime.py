import inspect
import os
import random
import textwrap

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


def _fake_cpu(monkeypatch, native_bf16: bool, deterministic: bool) -> None:
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda cpuinfo="/proc/cpuinfo": native_bf16)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: deterministic)


@pytest.mark.parametrize("native_bf16, deterministic, expected", [
    (True, False, "bf16"),  # e.g. `python -m companion train` on a Sapphire Rapids or Graviton 3
    (True, True, "fp32"),  # a notebook (setup_notebook turns deterministic algorithms on) on the same CPU
    (False, False, "fp32"),  # a CPU without bfloat16 instructions
    (False, True, "fp32"),
])
def test_cpu_precision_bf16_only_with_native_bf16_and_no_determinism(monkeypatch, native_bf16, deterministic,
                                                                      expected):
    _fake_cpu(monkeypatch, native_bf16, deterministic)
    for device in (None, "cpu"):
        p = choose_precision(device)
        assert (p.device.type, p.name, p.grad_scaler) == ("cpu", expected, False)
    assert choose_precision("cpu", prefer="fp32").name == "fp32"  # prefer overrides either way
    assert choose_precision("cpu", prefer="bf16").name == "bf16"


def test_cpu_fp32_autocast_is_a_no_op(monkeypatch):
    _fake_cpu(monkeypatch, native_bf16=False, deterministic=False)
    p = choose_precision("cpu")
    assert (p.dtype, p.grad_scaler, p.name) == (torch.float32, False, "fp32")
    x = torch.randn(2, 3)
    with p.autocast():
        assert (x @ x.T).dtype == torch.float32


def test_notebooks_get_fp32_even_on_a_bf16_cpu(monkeypatch):
    """The real switch, not a mock: setup_notebook's deterministic algorithms keep a bf16-capable CPU on fp32."""
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda cpuinfo="/proc/cpuinfo": True)
    before = torch.get_num_threads()
    try:
        torch.use_deterministic_algorithms(False)
        assert choose_precision("cpu").name == "bf16"
        companion.setup_notebook(seed=0, threads=before)
        assert choose_precision("cpu").name == "fp32"
    finally:
        runtime.set_deterministic(False)
        torch.set_num_threads(before)


@pytest.mark.parametrize("prefer, device, expected", [
    ("fp32", "cpu", "fp32 on cpu"),
    ("bf16", "cpu", "bf16 autocast on cpu"),
])
def test_precision_describe(prefer, device, expected):
    assert choose_precision(device, prefer=prefer).describe() == expected


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
    assert choose_precision("cuda:0").describe() == (
        "fp16 autocast + GradScaler on cuda:0" if expected == "fp16" else "bf16 autocast on cuda:0")


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
def test_cpu_bf16_capability_from_cpuinfo(tmp_path, monkeypatch, text, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text)
    assert runtime.cpu_has_native_bf16(cpuinfo) is native
    # the default reads /proc/cpuinfo: point it at the fake file, deterministic algorithms off
    monkeypatch.setattr(runtime.cpu_has_native_bf16, "__defaults__", (cpuinfo,))
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: False)
    assert choose_precision("cpu").name == ("bf16" if native else "fp32")


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


def test_show_source_is_the_package_source():
    from companion.nn.attention import MultiHeadAttention

    code = companion.show_source(MultiHeadAttention.forward)
    text = repr(code)
    assert text.startswith("def forward(")  # a method's indentation is removed
    assert text == textwrap.dedent(inspect.getsource(MultiHeadAttention.forward))
    with pytest.raises(TypeError, match="show_source needs"):
        companion.show_source(3)


def test_quiet_silences_a_tqdm_imported_before_it(capsys):
    import subprocess
    import sys

    code = ("import tqdm.auto, companion; companion.setup_notebook(threads=1)\n"
            "from tqdm.auto import tqdm\n"
            "assert list(tqdm(range(3), desc='bar')) == [0, 1, 2]\n")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "bar" not in out.stderr, out.stderr
