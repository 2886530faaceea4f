"""companion.nn.layers against nn.LayerNorm, nn.RMSNorm and transformers' LlamaMLP."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from companion.nn.layers import FeedForward, LayerNorm, RMSNorm, make_norm, swiglu_hidden


def randomise(*modules: nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in (p for m in modules for p in m.parameters()):
            p.copy_(torch.randn_like(p))


def test_layernorm_matches_torch():
    ours, ref = LayerNorm(24, eps=1e-5), nn.LayerNorm(24, eps=1e-5)
    randomise(ours, ref)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 24) * 5 + 2
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    no_bias = LayerNorm(24, bias=False)
    torch.testing.assert_close(no_bias(x), F.layer_norm(x, (24,)), rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_torch_and_keeps_dtype():
    ours, ref = RMSNorm(24, eps=1e-6), nn.RMSNorm(24, eps=1e-6)
    randomise(ref)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 24) * 5 + 2
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    y = ours(x.bfloat16())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref(x), rtol=2e-2, atol=2e-2)  # bf16 has 8 significant bits


def test_swiglu_matches_transformers_llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=32, intermediate_size=88, num_hidden_layers=1, vocab_size=16)
    torch.manual_seed(0)
    ref = LlamaMLP(config)
    ours = FeedForward(32, 88, kind="swiglu", bias=False)
    ours.load_state_dict({"gate.weight": ref.gate_proj.weight, "up.weight": ref.up_proj.weight,
                          "down.weight": ref.down_proj.weight})
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_gelu_ffn_is_two_linears_around_gelu():
    ffn = FeedForward(16, 64, kind="gelu")
    x = torch.randn(2, 3, 16)
    expected = F.linear(F.gelu(F.linear(x, ffn.up.weight, ffn.up.bias)), ffn.down.weight, ffn.down.bias)
    torch.testing.assert_close(ffn(x), expected)


def test_swiglu_width_and_errors():
    assert swiglu_hidden(4096, multiple_of=256) == 11008  # LLaMA-7B
    assert swiglu_hidden(768) == 2048
    with pytest.raises(ValueError, match="got 'tanh'"):
        FeedForward(8, 16, kind="tanh")
    with pytest.raises(ValueError, match="got 'batch'"):
        make_norm("batch", 8)


def test_gelu_tanh_is_gpt2s_approximation():
    ffn = FeedForward(16, 64, kind="gelu_tanh")
    x = torch.randn(2, 3, 16)
    h = ffn.up(x)
    gpt2_gelu = 0.5 * h * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (h + 0.044715 * h**3)))
    torch.testing.assert_close(ffn(x), ffn.down(gpt2_gelu), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ffn(x), ffn.down(F.gelu(h)), rtol=0, atol=1e-7)  # differs from exact GELU


def test_norms_compute_in_float64_for_float64_input():
    # The formulas written out in float64; a norm that upcast with x.float() would be off by ~1e-7 here.
    torch.manual_seed(0)
    x = torch.randn(3, 7, 24, dtype=torch.float64) * 5 + 2
    w, b = torch.randn(24, dtype=torch.float64), torch.randn(24, dtype=torch.float64)
    rms = RMSNorm(24, eps=1e-6).double()
    layer = LayerNorm(24, eps=1e-5).double()
    with torch.no_grad():
        rms.weight.copy_(w)
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    expected_rms = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w
    mean = x.mean(-1, keepdim=True)
    expected_layer = (x - mean) / ((x - mean).pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w + b
    for ours, expected in ((rms(x), expected_rms), (layer(x), expected_layer)):
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer(x), F.layer_norm(x, (24,), w, b, eps=1e-5), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_norms_compute_in_float32_below_float64(dtype):
    # float32 stays float32, bf16/fp16 are upcast to float32 and cast back: bit-identical to that computation.
    torch.manual_seed(0)
    x = (torch.randn(3, 7, 24) * 5 + 2).to(dtype)
    rms, layer = RMSNorm(24), LayerNorm(24)
    randomise(rms, layer)
    h = x.to(torch.float32)
    expected_rms = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + rms.eps) * rms.weight).to(dtype)
    expected_layer = F.layer_norm(h, (24,), layer.weight, layer.bias, layer.eps).to(dtype)  # one float32 kernel
    assert torch.equal(rms(x), expected_rms) and torch.equal(layer(x), expected_layer)
    mean, var = h.mean(-1, keepdim=True), h.var(-1, keepdim=True, unbiased=False)
    formula = ((h - mean) * torch.rsqrt(var + layer.eps) * layer.weight + layer.bias).to(dtype)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]  # one rounding of the output
    torch.testing.assert_close(layer(x).float(), formula.float(), rtol=tol, atol=tol * 10)


def test_layernorm_saves_its_input_and_two_floats_per_token():
    saved: list[torch.Tensor] = []
    layer = LayerNorm(24)
    x = torch.randn(3, 7, 24, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    params = {p.data_ptr() for p in layer.parameters()}
    kept = [t for t in saved if t.data_ptr() not in params]
    assert sorted(tuple(t.shape) for t in kept) == [(3, 7, 1), (3, 7, 1), (3, 7, 24)]  # mean, rstd, input
    assert any(t.data_ptr() == x.data_ptr() for t in kept)  # the input itself, not a copy
