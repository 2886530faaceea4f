"""companion.training.throughput: MFU arithmetic, datasheet look-up by device name, the probes (no timing asserts)."""

import math

import pytest
import torch

from companion.models import GPTConfig
from companion.scaling import flops_per_token
from companion.training.throughput import (
    GPU_PEAK_FLOPS,
    gpu_model,
    gpu_peak_flops,
    measure_matmul_peak,
    measure_throughput,
    mfu,
)


def test_mfu_arithmetic():
    # PaLM (Chowdhery et al. 2022, Table 3 and Appendix B): 540B on TPU v4 at 46.2% MFU. Here a round example:
    # 1,000 tokens/s of a model needing 6e9 FLOPs per token on a 12 TFLOP/s machine: 6e12 / 12e12 = 0.5.
    assert mfu(1_000, 6e9, 12e12) == pytest.approx(0.5, rel=1e-12)
    # GPT-2 small (Kaplan count with the head and full attention) at 100k tokens/s on an A100 in bf16.
    per_token = flops_per_token(GPTConfig.gpt2_small(), head=True, full_attention=True)
    assert mfu(1e5, per_token, gpu_peak_flops("bf16", "NVIDIA A100-SXM4-40GB")) == pytest.approx(
        1e5 * per_token / 312e12)
    assert mfu(2e3, 6e9, 1e12) == pytest.approx(12.0)  # not capped: a wrong peak must show


@pytest.mark.parametrize("name, row, bf16", [
    ("Tesla T4", "T4", None),
    ("Tesla V100-SXM2-16GB", "V100 SXM2", None),
    ("Tesla V100-PCIE-32GB", "V100 PCIe", None),
    ("NVIDIA A100-SXM4-40GB", "A100", 312e12),
    ("NVIDIA A100 80GB PCIe", "A100", 312e12),
    ("NVIDIA L4", "L4", 121e12),
    ("NVIDIA H100 80GB HBM3", "H100 SXM", 989e12),
    ("NVIDIA H100 PCIe", "H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", "H100 NVL", 835.5e12),
    ("NVIDIA H200", "H200 SXM", 989e12),
    ("NVIDIA H200 NVL", "H200 NVL", 835.5e12),
])
def test_datasheet_lookup_by_device_name(monkeypatch, name, row, bf16):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu_model() == gpu_model(name) == row
    if bf16 is None:  # no bfloat16 tensor cores: fp16 is the mixed-precision peak
        with pytest.raises(ValueError, match=f"{row} has no 'bf16' peak"):
            gpu_peak_flops("bf16")
        assert gpu_peak_flops("fp16") > 7 * gpu_peak_flops("fp32")  # tensor cores vs CUDA cores
    else:
        assert gpu_peak_flops("bf16") == bf16 == gpu_peak_flops("fp16")
        assert gpu_peak_flops("tf32") == pytest.approx(bf16 / 2, rel=0.01)  # TF32: half the 16-bit rate (rounded)


def test_datasheet_figures():
    assert GPU_PEAK_FLOPS["T4"]["fp16"] == 65e12 and GPU_PEAK_FLOPS["V100 SXM2"]["fp16"] == 125e12
    assert GPU_PEAK_FLOPS["H200 SXM"] == GPU_PEAK_FLOPS["H100 SXM"]  # same compute, more memory


@pytest.mark.parametrize("name", ["NVIDIA L40S", "Tesla V100S-PCIE-32GB", "NVIDIA GeForce RTX 4090"])
def test_unknown_gpus_are_not_matched_to_a_neighbour(name):
    with pytest.raises(ValueError, match=f"no datasheet peak for GPU '{name}'"):
        gpu_model(name)


@pytest.mark.parametrize("args, message", [
    ((0, 6e9, 1e12), "tokens_per_second must be a positive finite number, got 0"),
    ((1e3, -6e9, 1e12), "flops_per_token must be a positive finite number, got -6000000000.0"),
    ((1e3, 6e9, math.inf), "peak_flops must be a positive finite number, got inf"),
    ((1e3, 6e9, math.nan), "peak_flops must be a positive finite number, got nan"),
    ((True, 6e9, 1e12), "tokens_per_second must be a positive finite number, got True"),
])
def test_mfu_bad_input_names_the_value(args, message):
    with pytest.raises(ValueError, match=message):
        mfu(*args)


def test_probe_bad_input_names_the_value():
    with pytest.raises(ValueError, match="n must be an int >= 1, got 0"):
        measure_matmul_peak(n=0)
    with pytest.raises(ValueError, match="repeats must be an int >= 1, got 2.5"):
        measure_matmul_peak(repeats=2.5)
    with pytest.raises(ValueError, match="dtype must be a floating-point torch.dtype, got torch.int64"):
        measure_matmul_peak(torch.int64)
    with pytest.raises(ValueError, match="tokens_per_step must be an int >= 1, got 0"):
        measure_throughput(lambda: None, 0)
    with pytest.raises(ValueError, match="warmup must be an int >= 0, got -1"):
        measure_throughput(lambda: None, 8, warmup=-1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_probe_is_positive_and_finite(dtype):
    peak = measure_matmul_peak(dtype, n=128, repeats=3)
    assert math.isfinite(peak) and peak > 0


def test_measure_throughput_calls_the_step_and_returns_a_rate():
    calls = []
    rate = measure_throughput(lambda: calls.append(sum(range(1000))), tokens_per_step=64, warmup=2, repeats=3)
    assert len(calls) == 5  # 2 warm-up + 3 timed
    assert math.isfinite(rate) and rate > 0
