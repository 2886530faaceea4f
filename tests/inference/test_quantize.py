"""Quantization: error bounds, packing, module outputs against F.linear on dequantized weights, kernels vs the
dequantize reference, tied weights, saved size, bad configs."""

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_model
from torch import nn

from companion import GPT, GPTConfig, Llama, LlamaConfig
from companion.inference.quantize import (
    HAS_INT4PACK,
    HAS_INT8PACK,
    HAS_DYNAMIC_LINEAR,
    HAS_INT_MM,
    Int4Linear,
    Int8Embedding,
    Int8Linear,
    QuantConfig,
    QuantizedWeight,
    dequantize_int4,
    dequantize_int8,
    dequantize_model,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    quantize_activations,
    snr_db,
    state_dict_bytes,
    unpack_int4,
)


def weights(n=48, k=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    w[3, 5] = 12.0  # an outlier
    w[7] = 0.0  # an all-zero row
    return w


def test_int8_error_bound():
    w = weights()
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and int(q.abs().max()) <= 127
    err = (w - dequantize_int8(q, scale)).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5) + 1e-7).all()
    torch.testing.assert_close(scale[3], torch.tensor(12.0 / 127))  # the outlier sets its row's scale


@pytest.mark.parametrize("group_size", [16, 32, 128])
def test_int4_error_bound_per_group(group_size):
    w = weights()
    packed, scale, zero = quantize_int4(w, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 64) and scale.shape == (48, 128 // group_size)
    err = (w - dequantize_int4(packed, scale, zero)).abs().view(48, -1, group_size)  # (N, K/g, g)
    assert (err <= scale[..., None] / 2 * (1 + 1e-5) + 1e-6).all()
    # the group's extremes are represented (asymmetric: min -> 0, max -> 15)
    torch.testing.assert_close(dequantize_int4(packed, scale, zero).view(48, -1, group_size).amax(-1),
                               w.view(48, -1, group_size).amax(-1), atol=1e-5, rtol=1e-5)


def test_pack_unpack_exhaustive():
    pairs = torch.tensor(list(itertools.product(range(16), repeat=2)), dtype=torch.uint8)  # (256, 2)
    packed = pack_int4(pairs)
    assert packed.shape == (256, 1) and sorted(packed.flatten().tolist()) == list(range(256))  # a bijection
    assert torch.equal(unpack_int4(packed), pairs)
    assert int(pack_int4(torch.tensor([[1, 2]]))) == 1 + 2 * 16  # low nibble first


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="bits must be 8 or 4, got 3"):
        QuantConfig(bits=3)
    with pytest.raises(ValueError, match="group_size must be an even number"):
        QuantConfig(bits=4, group_size=7)
    with pytest.raises(ValueError, match="kernel must be"):
        QuantConfig(kernel="fast")
    with pytest.raises(ValueError, match="dynamic_activations needs bits=8"):
        QuantConfig(bits=4, dynamic_activations=True)
    with pytest.raises(ValueError, match="group_size 48 must divide in_features, got in_features=128"):
        quantize_int4(weights(), 48)
    with pytest.raises(ValueError, match="int4 values must lie in 0..15"):
        pack_int4(torch.tensor([[3, 16]]))
    with pytest.raises(ValueError, match="group_size 128 must divide"):
        quantize_model(nn.Sequential(nn.Linear(64, 8)), QuantConfig(bits=4, group_size=128))
    with pytest.raises(ValueError, match="Int4Linear needs a 4-bit weight"):
        Int4Linear(QuantizedWeight(weights(), 8))


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kernel", ["auto", "fused", "dequantize"])
def test_linear_matches_f_linear_on_dequantized(bits, kernel):
    lin = nn.Linear(128, 48)
    with torch.no_grad():
        lin.weight.copy_(weights())
    q = Int8Linear.from_linear(lin, kernel) if bits == 8 else Int4Linear.from_linear(lin, 32, kernel)
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(1))
    ref = F.linear(x, q.weight_q.dequantize(), lin.bias)
    # fused kernels accumulate in another order: float32 rounding only
    torch.testing.assert_close(q(x), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not (HAS_INT8PACK and HAS_INT4PACK), reason="torch has no fused CPU int8/int4 kernels")
def test_fused_kernels_are_used():
    lin = nn.Linear(128, 48)
    assert Int8Linear.from_linear(lin, "fused").kernel == "fused"
    assert Int4Linear.from_linear(lin, 64, "fused").kernel == "fused"
    assert Int4Linear.from_linear(lin, 16, "fused").kernel == "dequantize"  # group size the CPU kernel lacks
    assert Int4Linear.from_linear(nn.Linear(128, 40), 64, "fused").kernel == "dequantize"  # N % 16 != 0
    # "auto": integer matmul for W8A8, dequantize for weight-only (see the module docstring)
    assert Int8Linear.from_linear(lin, dynamic_activations=True).kernel == "fused"
    assert Int8Linear.from_linear(lin).kernel == Int4Linear.from_linear(lin, 64).kernel == "dequantize"


def test_activation_quantization_error_bound_and_zero():
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2)) + 0.5
    x[0, 0] = 0.0
    x[2] *= 100.0  # a row with huge activations does not coarsen the others: one scale per row
    scale, zero, q = quantize_activations(x)
    assert scale.shape == zero.shape == (3, 1) and float(scale[2]) > 50 * float(scale[1])
    assert q.dtype == torch.int8 and int(q.min()) >= 0 and int(q.max()) <= 127
    x_hat = (q.float() - zero) * scale
    assert ((x - x_hat).abs() <= scale / 2 * (1 + 1e-5)).all()
    assert float(x_hat[0, 0]) == 0.0  # zero is represented exactly
    scale0, zero0, q0 = quantize_activations(torch.zeros(2, 4))
    assert torch.allclose(scale0, torch.full((2, 1), 0.1)) and not zero0.any() and not q0.any()


@pytest.mark.parametrize("exact", [True, False])
def test_w8a8_several_rows_equal_the_reference_whether_or_not_int_mm_is_exact(exact, monkeypatch):
    import companion.inference.quantize as quant

    if exact and not quant.int_mm_is_exact():
        pytest.skip("torch._int_mm is not exact on this machine (the case exact=False covers it)")
    monkeypatch.setattr(quant, "int_mm_is_exact", lambda: exact)
    lin = nn.Linear(128, 48)
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(3))
    fused = Int8Linear.from_linear(lin, "fused", dynamic_activations=True)
    ref = Int8Linear.from_linear(lin, "dequantize", dynamic_activations=True)
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)


def test_int_mm_probe_agrees_with_a_product():
    import companion.inference.quantize as quant

    a = torch.randint(-127, 128, (9, 32), dtype=torch.int8, generator=torch.Generator().manual_seed(4))
    b = torch.randint(-127, 128, (32, 8), dtype=torch.int8, generator=torch.Generator().manual_seed(5))
    if HAS_INT_MM:  # the probe's verdict holds for another product too
        assert torch.equal(torch._int_mm(a, b).long(), a.long() @ b.long()) == quant.int_mm_is_exact()


@pytest.mark.skipif(not HAS_INT_MM, reason="torch has no _int_mm")
def test_dynamic_activations_int_mm_matches_reference(monkeypatch):
    import companion.inference.quantize as quant

    if not quant.int_mm_is_exact():
        pytest.skip("torch._int_mm is not exact on this machine")
    monkeypatch.setattr(quant, "HAS_DYNAMIC_LINEAR", False)  # the _int_mm path
    lin = nn.Linear(128, 48)
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(2))
    fused = Int8Linear.from_linear(lin, "fused", dynamic_activations=True)
    ref = Int8Linear.from_linear(lin, "dequantize", dynamic_activations=True)
    # integer products are exact (the zero point subtracted in integers); only the float rescaling and bias differ
    torch.testing.assert_close(fused(x), ref(x), atol=1e-5, rtol=1e-5)
    assert fused._fbgemm_weight() is None
    # in float64 the same W8A8 product runs on the reference path (activations still rounded to 7 bits)
    torch.testing.assert_close(fused.double()(x.double()), ref(x).double(), atol=1e-5, rtol=1e-5)
    # W8A8 is close to the float layer: the activation rounding adds a small error
    assert snr_db(lin(x), fused(x)) > 30


@pytest.mark.skipif(not HAS_DYNAMIC_LINEAR, reason="no quantized engine with a dynamic int8 linear")
def test_dynamic_activations_fbgemm_matches_reference_and_quantize_dynamic():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    torch.manual_seed(0)
    lin = nn.Linear(128, 48)
    x = torch.randn(2, 5, 128, generator=torch.Generator().manual_seed(2))
    fused = Int8Linear.from_linear(lin, "fused", dynamic_activations=True)
    ref = Int8Linear.from_linear(lin, "dequantize", dynamic_activations=True)
    assert fused._fbgemm_weight() is not None
    rows = x.reshape(10, 1, 128)  # one row per call: fbgemm's kernel
    out = torch.cat([fused(r) for r in rows]).view(2, 5, 48)
    expected = ref(x)
    # the kernel rounds x / scale in its own float order: an activation may land one step away (rarely), which
    # moves an output by at most scale * max|w| per flipped element
    bound = 3 * float(quantize_activations(x)[0].max()) * float(lin.weight.detach().abs().max())
    assert float((out - expected).abs().max()) <= bound
    assert snr_db(expected, out) > 40
    assert float((fused(x) - out).abs().max()) <= bound  # several rows: _int_mm, the same per-row scheme
    # the kernel is quantize_dynamic's: the same result as torch.ao's module holding our per-channel weights
    w = fused.weight_q
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # quantized tensors are deprecated (their kernels are not)
        qw = torch._make_per_channel_quantized_tensor(w.qweight, w.scale.double(), torch.zeros(48, dtype=torch.long), 0)
        theirs = DynamicLinear(128, 48, dtype=torch.qint8)
        theirs.set_weight_bias(qw, lin.bias.detach())
        torch.testing.assert_close(out, torch.cat([theirs(r) for r in rows]).view(2, 5, 48), atol=0, rtol=0)
    x = rows[0]
    out = fused(x)
    # a changed bias is packed again; a copy packs on first use
    with torch.no_grad():
        fused.bias.add_(1.0)
    torch.testing.assert_close(fused(x), out + 1.0, atol=1e-5, rtol=1e-5)
    twin = copy.deepcopy(fused)
    assert twin._packed is None
    torch.testing.assert_close(twin(x), fused(x), atol=0, rtol=0)


@pytest.mark.parametrize("bits,group_size", [(8, 128), (4, 32)])
def test_tied_gpt_quantized_once(bits, group_size, tmp_path):
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny()).eval()
    idx = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        before = model(idx)
    quantize_model(model, QuantConfig(bits=bits, group_size=group_size))
    assert isinstance(model.tok_emb, (Int8Embedding if bits == 8 else nn.Module))
    assert model.lm_head.weight_q is model.tok_emb.weight_q  # still tied, one copy
    with torch.no_grad():
        after = model(idx)
    assert snr_db(before, after) > (30 if bits == 8 else 10)
    # the quantized model equals the float model holding the dequantized weights
    deq = dequantize_model(model)
    assert deq.lm_head.weight is deq.tok_emb.weight
    with torch.no_grad():
        torch.testing.assert_close(deq(idx), after, atol=1e-4, rtol=1e-4)
    # saved size: the safetensors file is the payload plus a small JSON header
    quantize_model(deq, QuantConfig(bits=bits, group_size=group_size))
    path = tmp_path / "q.safetensors"
    save_model(deq, str(path))
    assert 0 < path.stat().st_size - state_dict_bytes(deq) < 20_000


def test_saved_size_arithmetic():
    torch.manual_seed(0)
    model = Llama(LlamaConfig.tiny())  # untied: embedding (256, 64), lm_head (256, 64)
    fp32 = state_dict_bytes(model)
    n_params = sum(p.numel() for p in model.parameters())
    assert fp32 == 4 * n_params
    linear = [m for m in model.modules() if type(m) is nn.Linear]
    q8 = quantize_model(Llama(LlamaConfig.tiny()), QuantConfig(bits=8))
    # int8: 1 byte per weight + one fp32 scale per output row, for every Linear and the embedding
    others = n_params - sum(m.weight.numel() for m in linear) - model.tok_emb.weight.numel()
    expected8 = sum(m.weight.numel() + 4 * m.out_features for m in linear) + 256 * 64 + 4 * 256 + 4 * others
    assert state_dict_bytes(q8) == expected8
    q4 = quantize_model(Llama(LlamaConfig.tiny()), QuantConfig(bits=4, group_size=16))  # 16 divides d_ff=176
    # int4: half a byte per weight + fp32 scale and zero per group of 16
    def int4(n, k):
        return n * k // 2 + 8 * n * k // 16
    expected4 = sum(int4(m.out_features, m.in_features) for m in linear) + int4(256, 64) + 4 * others
    assert state_dict_bytes(q4) == expected4


def test_skip_patterns_keep_float():
    model = quantize_model(Llama(LlamaConfig.tiny()), QuantConfig(skip=("lm_head", "blocks.0.*")))
    assert type(model.lm_head) is nn.Linear
    assert all(type(m) is nn.Linear for m in model.blocks[0].modules() if isinstance(m, nn.Linear))
    assert any(isinstance(m, Int8Linear) for m in model.blocks[1].modules())
