"""`optimize_for_decoding`: the optimized model computes what the plain one computes (float32 rounding), decodes the
same tokens, keeps its parameters, names, shapes and state_dict, and `restore_modules` gives the plain model back.

Models are tiny GPT-2 and Llama (grouped-query) models of ours with weights drawn from N(0, 0.25^2), so greedy
choices are far from ties.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from companion.inference import GenerationConfig, generate
import companion.inference.optimize as optimize
from companion.inference.optimize import (EvalDropout, FusedRMSNorm, SplitLinear, column_major,
                                          fuse_int8_qkv, fuse_qkv, optimize_for_decoding, restore_modules, unfuse_qkv)
from companion.inference.quantize import Int8Linear, QuantConfig, quantize_model
from companion.models import GPT, GPTConfig, Llama, LlamaConfig
from companion.nn.attention import AttentionConfig, MultiHeadAttention
from companion.nn.layers import RMSNorm


def _model(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(replace(GPTConfig.tiny(), vocab_size=97, n_ctx=48))
    else:
        model = Llama(replace(LlamaConfig.tiny(), vocab_size=97, n_ctx=48, n_kv_heads=2))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) * 0.25)
    return model.eval()


@pytest.fixture(params=["gpt", "llama"])
def model(request, monkeypatch):
    monkeypatch.setattr(optimize, "SPLIT_MIN_ELEMENTS", 0)  # tiny matrices take the split path too
    return _model(request.param)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("linear", ["auto", "torch"])
def test_same_logits_and_tokens(model, linear, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # P = 3 does not divide every width: fallback
    fast = optimize_for_decoding(copy.deepcopy(model), linear=linear)
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        torch.testing.assert_close(fast(ids), model(ids), rtol=1e-5, atol=1e-5)  # float32 rounding of other kernels
    config = GenerationConfig(max_new_tokens=24)
    assert torch.equal(generate(fast, ids[:1, :5], config=config).sequences,
                       generate(model, ids[:1, :5], config=config).sequences)


def test_modules_swapped_and_state_kept(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {name: id(p) for name, p in model.named_parameters()}
    optimize_for_decoding(model)
    assert {name: id(p) for name, p in model.named_parameters()} == params  # the same Parameter objects
    after = model.state_dict()
    assert after.keys() == before.keys()  # the fused q/k/v matrix is not saved
    for k in before:
        assert after[k].shape == before[k].shape and torch.equal(after[k], before[k]), k
    kinds = {type(m) for m in model.modules()}
    assert not kinds & {RMSNorm, nn.Dropout}
    assert EvalDropout in kinds
    assert (FusedRMSNorm in kinds) == isinstance(model, Llama)  # LayerNorm is one kernel already
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert attentions and all(a.fused_qkv is not None for a in attentions)
    if model.config.tie_embeddings:
        assert model.lm_head.weight is model.tok_emb.weight  # still tied
    wide = model.lm_head.weight  # (V, C) with V > C: stored column-major on CPU
    assert wide.stride() == (1, wide.shape[0])


def test_fused_qkv_shares_the_parameters():
    torch.manual_seed(0)
    attn = MultiHeadAttention(AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, causal=True)).eval()
    x = torch.randn(2, 5, 32)
    reference = attn(x)[0]
    assert fuse_qkv(attn, layout=column_major)
    torch.testing.assert_close(attn(x)[0], reference, rtol=1e-6, atol=1e-6)
    with torch.no_grad():  # an in-place update of a projection reaches the fused matrix
        attn.k_proj.weight.mul_(2.0)
    fused_out = attn(x)[0]
    unfuse_qkv(attn)
    assert attn.fused_qkv is None and attn.k_proj.weight.is_contiguous()
    torch.testing.assert_close(attn(x)[0], fused_out, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(fused_out, reference)


def test_cross_attention_is_not_fused():
    cross = MultiHeadAttention(AttentionConfig(d_model=32, n_heads=4, kv_dim=16))
    assert not fuse_qkv(cross) and not fuse_int8_qkv(cross)


@pytest.mark.parametrize("dynamic", [False, True])
def test_int8_projections_fused(dynamic):
    model = quantize_model(_model("gpt"), QuantConfig(bits=8, dynamic_activations=dynamic))
    reference = copy.deepcopy(model)
    keys = model.state_dict().keys()
    optimize_for_decoding(model)
    attentions = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert all(isinstance(a.fused_qkv, Int8Linear) for a in attentions)
    assert model.state_dict().keys() == keys  # the fused int8 matrix is not saved
    a = attentions[0]
    assert a.q_proj.weight_q.qweight.data_ptr() == a.fused_qkv.weight_q.qweight.data_ptr()  # views, no copy
    ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids), reference(ids), rtol=1e-4, atol=1e-4)
        for t in range(1, 4):  # single rows take fbgemm's kernel under W8A8
            torch.testing.assert_close(model(ids[:, :t]), reference(ids[:, :t]), rtol=1e-4, atol=1e-4)
    config = GenerationConfig(max_new_tokens=16)
    assert torch.equal(generate(model, ids[:, :4], config=config).sequences,
                       generate(reference, ids[:, :4], config=config).sequences)
    restore_modules(model)
    assert all(a.fused_qkv is None for a in attentions)
    storage = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert storage(a.q_proj.weight_q.qweight) != storage(a.k_proj.weight_q.qweight)  # own copies again


def test_restore_gives_the_plain_model_back(model):
    reference = copy.deepcopy(model)
    restore_modules(optimize_for_decoding(model))
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(m.fused_qkv is None for m in model.modules() if isinstance(m, MultiHeadAttention))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["row-major", "column-major"])
def test_split_linear_equals_linear(layout, monkeypatch):
    monkeypatch.setattr(optimize, "SPLIT_MIN_ELEMENTS", 0)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    torch.manual_seed(0)
    plain = nn.Linear(24, 40)
    split = copy.deepcopy(plain)
    split.__class__ = SplitLinear
    if layout == "column-major":
        split.weight.data = column_major(split.weight.data)
    x = torch.randn(1, 1, 24)
    with torch.inference_mode():
        torch.testing.assert_close(split(x), plain(x), rtol=1e-6, atol=1e-6)  # one row: the split path
        torch.testing.assert_close(split(x.expand(3, 1, 24)), plain(x.expand(3, 1, 24)), rtol=1e-6, atol=1e-6)
    x = torch.randn(1, 24, requires_grad=True)
    split(x).sum().backward()  # with gradients it is nn.Linear
    plain_x = x.detach().clone().requires_grad_()
    plain(plain_x).sum().backward()
    torch.testing.assert_close(x.grad, plain_x.grad)
    torch.testing.assert_close(split.weight.grad, plain.weight.grad)


def test_eval_dropout_still_drops_in_training():
    drop = nn.Dropout(0.5)
    drop.__class__ = EvalDropout
    x = torch.ones(1000)
    assert torch.equal(drop.eval()(x), x)
    assert (drop.train()(x) == 0).any()


def test_bad_kernel_name():
    with pytest.raises(ValueError, match="linear must be"):
        optimize_for_decoding(_model("gpt"), linear="onednn")
