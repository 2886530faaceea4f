"""companion.nn.attention against F.scaled_dot_product_attention, nn.MultiheadAttention and transformers' Llama."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from companion.nn.attention import (
    AttentionConfig,
    KVCache,
    MultiHeadAttention,
    causal_mask,
    padding_mask,
    scaled_dot_product_attention,
)
from companion.nn.positional import RopeScaling

TOL = dict(rtol=1e-5, atol=1e-5)  # float32, a few hundred terms per dot product


def qkv(b=2, h=4, g=4, t=5, s=5, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t, d, generator=gen), torch.randn(b, g, s, d, generator=gen),
            torch.randn(b, g, s, d, generator=gen))


def test_matches_torch_without_mask():
    q, k, v = qkv()
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v), **TOL)


@pytest.mark.parametrize("kind", ["bool", "float", "causal", "gqa", "mqa", "scale"])
def test_math_and_torch_backends_match_torch(kind):
    g = {"gqa": 2, "mqa": 1}.get(kind, 4)
    q, k, v = qkv(g=g, t=6, s=6)
    kwargs, ref_kwargs = {}, {"enable_gqa": g != 4}
    if kind == "bool":
        mask = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.4
        mask[..., 0] = True  # every query keeps one key
        kwargs["mask"] = ref_kwargs["attn_mask"] = mask
    elif kind == "float":
        mask = torch.randn(4, 6, 6)
        kwargs["mask"] = ref_kwargs["attn_mask"] = mask
    elif kind in ("causal", "gqa", "mqa"):
        kwargs["is_causal"] = ref_kwargs["is_causal"] = True
    elif kind == "scale":
        kwargs["scale"] = ref_kwargs["scale"] = 0.3
    expected = F.scaled_dot_product_attention(q, k, v, **ref_kwargs)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, **kwargs), expected, **TOL)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, backend="torch", **kwargs), expected, **TOL)


def test_gradients_match_torch():
    q, k, v = (x.requires_grad_() for x in qkv(g=2))
    ours = torch.autograd.grad(scaled_dot_product_attention(q, k, v, is_causal=True).square().sum(), (q, k, v))
    ref = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
                              .square().sum(), (q, k, v))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **TOL)


def test_fully_masked_row_gives_zeros_like_torch():
    q, k, v = qkv(b=1, h=2, g=2, t=3, s=3)
    mask = torch.tensor([[True, False, False], [False, False, False], [True, True, True]])
    out, w = scaled_dot_product_attention(q, k, v, mask, return_weights=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), **TOL)
    assert torch.all(out[:, :, 1] == 0) and torch.all(w[:, :, 1] == 0)
    additive = torch.zeros(3, 3).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, additive), out, **TOL)


def test_weights_are_a_distribution_and_reproduce_output():
    q, k, v = qkv()
    out, w = scaled_dot_product_attention(q, k, v, is_causal=True, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 5))
    assert torch.all(w.triu(diagonal=1) == 0)  # no weight on the future
    torch.testing.assert_close(w @ v, out)


def test_dropout_zeroes_and_rescales_weights():
    q, k, v = qkv(t=16, s=16)
    _, w = scaled_dot_product_attention(q, k, v, return_weights=True)
    torch.manual_seed(0)
    out, wd = scaled_dot_product_attention(q, k, v, dropout_p=0.5, return_weights=True)
    kept = wd != 0
    assert 0.4 < kept.float().mean() < 0.6
    torch.testing.assert_close(wd[kept], w[kept] / 0.5)
    torch.testing.assert_close(out, wd @ v)


def test_causal_mask_is_bottom_right_aligned_for_cached_keys():
    q, k, v = qkv(t=7, s=7)
    full = scaled_dot_product_attention(q, k, v, is_causal=True)
    last3 = scaled_dot_product_attention(q[:, :, -3:], k, v, is_causal=True)
    torch.testing.assert_close(last3, full[:, :, -3:], **TOL)
    assert causal_mask(2, 4).tolist() == [[True, True, True, False], [True, True, True, True]]


def test_bad_inputs_name_the_values():
    q, k, v = qkv(h=4, g=3)
    with pytest.raises(ValueError, match="H=4 and G=3"):
        scaled_dot_product_attention(q, k, v)
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"mask of shape \(5, 4\) does not broadcast.*\(2, 4, 5, 5\)"):
        scaled_dot_product_attention(q, k, v, torch.ones(5, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="only available from backend='math'"):
        scaled_dot_product_attention(q, k, v, return_weights=True, backend="torch")
    with pytest.raises(ValueError, match="d_model=10 and n_heads=3"):
        AttentionConfig(d_model=10, n_heads=3)
    with pytest.raises(ValueError, match="n_heads=8 and n_kv_heads=3"):
        AttentionConfig(d_model=64, n_heads=8, n_kv_heads=3)
    with pytest.raises(ValueError, match=r"shape \(B, S\), got shape \(5,\)"):
        padding_mask(torch.ones(5))
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, 16\), got \(2, 3, 8\)"):
        MultiHeadAttention(AttentionConfig(16, 2))(torch.randn(2, 3, 8))


def copy_from_torch_mha(ours: MultiHeadAttention, ref: nn.MultiheadAttention) -> None:
    with torch.no_grad():
        if ref.in_proj_weight is not None:
            wq, wk, wv = ref.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = ref.q_proj_weight, ref.k_proj_weight, ref.v_proj_weight
        for lin, w, b in zip((ours.q_proj, ours.k_proj, ours.v_proj), (wq, wk, wv), ref.in_proj_bias.chunk(3)):
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        ours.out_proj.weight.copy_(ref.out_proj.weight)
        ours.out_proj.bias.copy_(ref.out_proj.bias)


@pytest.mark.parametrize("backend", ["torch", "math"])
def test_self_attention_matches_nn_multiheadattention(backend):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    ours = MultiHeadAttention(AttentionConfig(32, 4, causal=True, backend=backend)).eval()
    copy_from_torch_mha(ours, ref)
    x = torch.randn(2, 6, 32)
    real = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    # nn.MultiheadAttention's masks mean the opposite: True = do NOT attend
    expected, ref_w = ref(x, x, x, attn_mask=~causal_mask(6), key_padding_mask=real == 0,
                          average_attn_weights=False)
    out, _ = ours(x, mask=padding_mask(real))
    torch.testing.assert_close(out, expected, **TOL)
    _, w = ours(x, mask=padding_mask(real), need_weights=True)
    torch.testing.assert_close(w, ref_w, **TOL)


def test_cross_attention_matches_nn_multiheadattention():
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(32, 4, kdim=20, vdim=20, batch_first=True).eval()
    ours = MultiHeadAttention(AttentionConfig(32, 4, kv_dim=20, causal=True)).eval()  # causal ignored for cross
    copy_from_torch_mha(ours, ref)
    x, ctx = torch.randn(2, 5, 32), torch.randn(2, 7, 20)
    expected, _ = ref(x, ctx, ctx)
    torch.testing.assert_close(ours(x, ctx)[0], expected, **TOL)


def test_gqa_with_rope_matches_transformers_llama_attention():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
                         num_hidden_layers=1, vocab_size=16)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = LlamaAttention(config, layer_idx=0).eval()
    ours = MultiHeadAttention(AttentionConfig(64, 8, n_kv_heads=2, causal=True, bias=False,
                                              positional="rope")).eval()
    ours.load_state_dict({"q_proj.weight": ref.q_proj.weight, "k_proj.weight": ref.k_proj.weight,
                          "v_proj.weight": ref.v_proj.weight, "out_proj.weight": ref.o_proj.weight})
    x = torch.randn(2, 9, 64)
    position_ids = torch.arange(9)[None].expand(2, 9)
    cos_sin = LlamaRotaryEmbedding(config)(x, position_ids)
    additive = torch.zeros(9, 9).masked_fill(~causal_mask(9), float("-inf"))[None, None]
    expected, ref_w = ref(x, position_embeddings=cos_sin, attention_mask=additive)
    out, w = ours(x, need_weights=True)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(w, ref_w, **TOL)


@pytest.mark.parametrize("rope_type", ["linear", "llama3"])
def test_scaled_rope_attention_matches_transformers_llama_attention(rope_type):
    # AttentionConfig.rope_scaling reaches the layer's RoPE: scaled cos/sin from transformers, 40 positions, past
    # the original length 16 of "llama3" (head dim 8, wavelengths 6.3, 63, 628, 6283: the first interpolated, the
    # rest divided by the factor)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

    llama3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    fields, scaling = {"linear": ({"factor": 2.0}, RopeScaling.linear(2.0)),
                       "llama3": (llama3, RopeScaling.llama3(**llama3))}[rope_type]
    config = LlamaConfig(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=96,
                         num_hidden_layers=1, vocab_size=16, max_position_embeddings=64,
                         rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **fields})
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    ref = LlamaAttention(config, layer_idx=0).eval()
    cfg = AttentionConfig(64, 8, n_kv_heads=2, causal=True, bias=False, positional="rope", rope_scaling=scaling)
    ours, plain = MultiHeadAttention(cfg).eval(), MultiHeadAttention(replace(cfg, rope_scaling=None)).eval()
    weights = {"q_proj.weight": ref.q_proj.weight, "k_proj.weight": ref.k_proj.weight,
               "v_proj.weight": ref.v_proj.weight, "out_proj.weight": ref.o_proj.weight}
    ours.load_state_dict(weights)
    plain.load_state_dict(weights)
    x = torch.randn(2, 40, 64) * 4  # large enough that the rotation angles matter
    cos_sin = LlamaRotaryEmbedding(config)(x, torch.arange(40)[None].expand(2, 40))
    additive = torch.zeros(40, 40).masked_fill(~causal_mask(40), float("-inf"))[None, None]
    expected, _ = ref(x, position_embeddings=cos_sin, attention_mask=additive)
    torch.testing.assert_close(ours(x)[0], expected, **TOL)
    assert (plain(x)[0] - expected).abs().max() > 100 * TOL["atol"]  # plain RoPE is far off


def test_rope_scaling_config_errors():
    with pytest.raises(ValueError, match="rope_scaling must be a RopeScaling or None, got {'factor': 2.0}"):
        AttentionConfig(16, 2, positional="rope", rope_scaling={"factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling needs positional='rope', got positional='alibi'"):
        AttentionConfig(16, 2, positional="alibi", rope_scaling=RopeScaling.linear(2.0))
    assert MultiHeadAttention(AttentionConfig(16, 2, positional="rope")).rope.scaling is None


@pytest.mark.parametrize("positional", ["none", "rope", "alibi"])
@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_kv_cache_decoding_equals_full_causal_pass(positional, n_kv_heads):
    torch.manual_seed(0)
    attn = MultiHeadAttention(AttentionConfig(32, 4, n_kv_heads=n_kv_heads, causal=True,
                                              positional=positional)).eval()
    x = torch.randn(2, 7, 32)
    full, _ = attn(x)
    cache = KVCache()
    pieces = [attn(x[:, :4], kv_cache=cache)[0]]  # prompt
    pieces += [attn(x[:, i : i + 1], kv_cache=cache)[0] for i in range(4, 7)]  # one token at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)
    assert cache.seq_len == 7 and cache.k.shape == (2, n_kv_heads, 7, 8)


def test_mqa_and_gqa_shrink_the_key_value_projections():
    sizes = {g: MultiHeadAttention(AttentionConfig(64, 8, n_kv_heads=g)).k_proj.weight.shape for g in (8, 2, 1)}
    assert sizes == {8: (64, 64), 2: (16, 64), 1: (8, 64)}


def test_kv_cache_rejected_for_cross_attention():
    attn = MultiHeadAttention(AttentionConfig(16, 2))
    with pytest.raises(ValueError, match="kv_cache is for self-attention"):
        attn(torch.randn(1, 2, 16), torch.randn(1, 3, 16), kv_cache=KVCache())


def test_config_scale_is_passed_to_the_kernel():
    torch.manual_seed(0)
    attn = MultiHeadAttention(AttentionConfig(16, 2, scale=1.0, bias=False)).eval()
    x = torch.randn(1, 4, 16)
    q, k, v = (rearrange(p(x), "b t (h d) -> b h t d", h=2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    expected = attn.out_proj(rearrange(F.scaled_dot_product_attention(q, k, v, scale=1.0), "b h t d -> b t (h d)"))
    torch.testing.assert_close(attn(x)[0], expected, **TOL)
    torch.testing.assert_close(attn(x, need_weights=True)[0], expected, **TOL)
    with pytest.raises(ValueError, match="scale must be positive.*got -1.0"):
        AttentionConfig(16, 2, scale=-1.0)


def test_float_mask_row_of_minus_inf_gives_zero_output_and_finite_gradients():
    """A float mask that blocks every key of a row: output 0 (as SDPA) and gradients without NaN, equal to SDPA's."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[..., 2, :] = float("-inf")  # query 2 sees nothing
    ours = scaled_dot_product_attention(q, k, v, mask, backend="math")
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    ref_grads = torch.autograd.grad(torch.nan_to_num(ref).square().sum(), (q, k, v))
    assert torch.equal(ours[..., 2, :], torch.zeros_like(ours[..., 2, :]))
    for a, b in zip(grads, ref_grads):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, torch.nan_to_num(b), atol=1e-12, rtol=0)
