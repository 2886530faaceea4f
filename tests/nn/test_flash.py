"""Online softmax and tiled attention equal the formula: against torch.logsumexp / torch.softmax,
F.scaled_dot_product_attention and the package's math path, in float64 (to ~1e-12) and float32 (to 1e-5)."""

import math

import pytest
import torch
import torch.nn.functional as F

from companion.nn import causal_mask, padding_mask, scaled_dot_product_attention
from companion.nn.flash import (count_blocks, online_logsumexp, online_softmax, peak_tensor_bytes, tiled_attention,
                                tiled_attention_backward)

F64 = dict(rtol=1e-12, atol=1e-12)
F32 = dict(rtol=1e-5, atol=1e-5)


def qkv(b, h, t, s, d, g=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    g = h if g is None else g
    q = torch.randn(b, h, t, d, generator=gen, dtype=dtype)
    k = torch.randn(b, g, s, d, generator=gen, dtype=dtype)
    v = torch.randn(b, g, s, d + 3, generator=gen, dtype=dtype)  # Dv != D on purpose
    return q, k, v


@pytest.mark.parametrize("block", [1, 3, 7, 16, 100])
def test_online_logsumexp_and_softmax_match_torch(block):
    x = torch.randn(4, 5, 37, dtype=torch.float64) * 10  # large scores: the running max matters
    torch.testing.assert_close(online_logsumexp(x, block), torch.logsumexp(x, dim=-1), **F64)
    torch.testing.assert_close(online_softmax(x, block), torch.softmax(x, dim=-1), **F64)


def test_online_logsumexp_survives_scores_that_overflow_exp():
    x = torch.tensor([[1000.0, 1001.0, 999.0, 1002.0]], dtype=torch.float32)
    assert torch.isinf(torch.exp(x).sum())  # the naive normaliser overflows
    torch.testing.assert_close(online_logsumexp(x, 1), torch.logsumexp(x, dim=-1))


def test_online_logsumexp_all_masked_row_is_minus_inf():
    x = torch.tensor([[0.0, 1.0, 2.0], [float("-inf")] * 3], dtype=torch.float64)
    lse = online_logsumexp(x, 2)
    assert torch.isneginf(lse[1]) and torch.isfinite(lse[0])
    assert torch.equal(online_softmax(x, 2)[1], torch.zeros(3, dtype=torch.float64))


@pytest.mark.parametrize("b,h,t,s,d,bq,bk", [
    (2, 3, 50, 50, 8, 16, 16),    # blocks don't divide T
    (1, 2, 33, 70, 16, 7, 13),    # T != S, odd blocks
    (2, 1, 5, 5, 4, 64, 64),      # one block larger than the sequence
    (1, 4, 64, 64, 32, 64, 1),    # one key at a time
    (1, 2, 17, 17, 8, 1, 5),      # one query at a time
])
@pytest.mark.parametrize("causal", [False, True])
def test_tiled_matches_sdpa_and_math_path_float64(b, h, t, s, d, bq, bk, causal):
    q, k, v = qkv(b, h, t, s, d)
    ours, lse = tiled_attention(q, k, v, is_causal=causal, block_q=bq, block_k=bk, return_lse=True)
    math_out, weights = scaled_dot_product_attention(q, k, v, is_causal=causal, return_weights=True)
    torch.testing.assert_close(ours, math_out, **F64)
    if s == t:  # torch's is_causal is top-left aligned; equal to ours when T == S
        torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=causal), **F64)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)
    if causal:
        scores = scores.masked_fill(~causal_mask(t, s), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, dim=-1), **F64)


@pytest.mark.parametrize("causal", [False, True])
def test_tiled_matches_in_float32(causal):
    q, k, v = qkv(2, 4, 130, 130, 32, dtype=torch.float32)
    ours = tiled_attention(q, k, v, is_causal=causal, block_q=32, block_k=48)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=causal), **F32)
    torch.testing.assert_close(ours, scaled_dot_product_attention(q, k, v, is_causal=causal), **F32)


def test_padding_mask_with_causal_and_fully_masked_rows():
    q, k, v = qkv(2, 2, 9, 9, 8)
    real = torch.tensor([[1] * 9, [1] * 4 + [0] * 5])
    pad = padding_mask(real)  # (B, 1, 1, S)
    ours = tiled_attention(q, k, v, pad, is_causal=True, block_q=4, block_k=3)
    ref = scaled_dot_product_attention(q, k, v, pad, is_causal=True)
    torch.testing.assert_close(ours, ref, **F64)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, attn_mask=pad & causal_mask(9)), **F64)
    # a query whose keys are all padding gets zero output and lse -inf, like the math path
    none_real = torch.zeros(1, 9, dtype=torch.long)
    out, lse = tiled_attention(q[:1], k[:1], v[:1], padding_mask(none_real), block_q=4, block_k=4, return_lse=True)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_float_mask_and_grouped_query_heads():
    q, k, v = qkv(1, 6, 20, 20, 8, g=2)
    bias = torch.randn(6, 20, 20, dtype=torch.float64)  # e.g. ALiBi-like additive bias, broadcast over B
    ours = tiled_attention(q, k, v, bias, block_q=6, block_k=7)
    torch.testing.assert_close(ours, scaled_dot_product_attention(q, k, v, bias), **F64)


def test_gradients_equal_the_math_path():
    q, k, v = (t.requires_grad_() for t in qkv(1, 2, 23, 23, 8))
    tiled_attention(q, k, v, is_causal=True, block_q=5, block_k=6).square().sum().backward()
    ours = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    scaled_dot_product_attention(q, k, v, is_causal=True).square().sum().backward()
    for a, t in zip(ours, (q, k, v)):
        torch.testing.assert_close(a, t.grad, **F64)


def _grads(fn, q, k, v):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()  # a non-uniform upstream gradient
    return q.grad, k.grad, v.grad


@pytest.mark.parametrize("causal", [False, True])
def test_recomputing_backward_matches_autograd_with_gqa_and_padding(causal):
    q, k, v = qkv(2, 4, 19, 19, 8, g=2)
    pad = padding_mask(torch.tensor([[1] * 19, [1] * 11 + [0] * 8]))
    ours = _grads(lambda a, b, c: tiled_attention(a, b, c, pad, is_causal=causal, block_q=4, block_k=5), q, k, v)
    ref = _grads(lambda a, b, c: scaled_dot_product_attention(a, b, c, pad, is_causal=causal), q, k, v)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **F64)


def test_backward_with_a_float_mask_and_rows_with_no_key():
    q, k, v = qkv(1, 2, 10, 10, 8)
    bias = torch.randn(2, 10, 10, dtype=torch.float64)
    bias[:, 3] = float("-inf")  # query row 3 sees no key: zero output, zero gradient, no NaN
    ours = _grads(lambda a, b, c: tiled_attention(a, b, c, bias, block_q=3, block_k=4), q, k, v)
    ref = _grads(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=bias), q, k, v)
    for a, b in zip(ours, ref):
        assert bool(torch.isfinite(a).all())
        torch.testing.assert_close(a, b, **F64)
    assert torch.equal(ours[0][:, :, 3], torch.zeros_like(ours[0][:, :, 3]))


def test_backward_function_called_directly_and_gradcheck():
    q, k, v = qkv(1, 2, 7, 9, 4)
    out, lse = tiled_attention(q, k, v, is_causal=True, block_q=3, block_k=2, return_lse=True)
    grad_out = torch.randn_like(out)
    dq, dk, dv = tiled_attention_backward(q, k, v, out, lse, grad_out, is_causal=True, block_q=3, block_k=2)
    q2, k2, v2 = (t.clone().requires_grad_() for t in (q, k, v))
    scaled_dot_product_attention(q2, k2, v2, is_causal=True).backward(grad_out)
    for a, b in zip((dq, dk, dv), (q2.grad, k2.grad, v2.grad)):
        torch.testing.assert_close(a, b, **F64)
    inputs = tuple(t.clone().requires_grad_() for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: tiled_attention(a, b, c, block_q=4, block_k=4), inputs)


def test_training_keeps_linear_memory_like_sdpa():
    def saved(fn, t):
        q, k, v = (x.float().requires_grad_() for x in qkv(1, 2, t, t, 16))
        storages = {}

        def pack(x):
            storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            fn(q, k, v)
        return sum(storages.values())

    def tiled(q, k, v):
        return tiled_attention(q, k, v, is_causal=True, block_q=32, block_k=32)

    def math_path(q, k, v):
        return scaled_dot_product_attention(q, k, v, is_causal=True)

    assert saved(tiled, 512) == 2 * saved(tiled, 256)  # q, k, v, out, lse: all O(T)
    assert saved(math_path, 512) > 3.5 * saved(math_path, 256)


def test_causal_skips_the_blocks_above_the_diagonal():
    assert count_blocks(256, 256, 64, 64, is_causal=False) == (16, 16)
    assert count_blocks(256, 256, 64, 64, is_causal=True) == (10, 16)  # 4 + 3 + 2 + 1 on and below the diagonal
    assert count_blocks(100, 100, 30, 30, is_causal=True) == (10, 16)  # ragged last block
    visited, total = count_blocks(4096, 4096, 64, 64, is_causal=True)
    assert visited == 64 * 65 // 2 and total == 64 * 64


def test_bad_arguments_name_the_values():
    q, k, v = qkv(1, 2, 4, 4, 8)
    with pytest.raises(ValueError, match="block_q must be a positive int, got 0"):
        tiled_attention(q, k, v, block_q=0)
    with pytest.raises(ValueError, match="H=2 and G=3"):
        tiled_attention(q, *qkv(1, 3, 4, 4, 8)[1:])
    with pytest.raises(ValueError, match=r"does not broadcast to \(B, H, T, S\)"):
        tiled_attention(q, k, v, torch.ones(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="S >= T keys, got T=4 and S=2"):
        tiled_attention(q, k[:, :, :2], v[:, :, :2], is_causal=True)
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        online_logsumexp(q, 0)


def test_peak_tensor_bytes_counts_what_is_alive_at_once():
    x = torch.ones(1000, dtype=torch.float32)
    _, one = peak_tensor_bytes(lambda t: t * 2, x)
    assert one == 4000  # the result only; the input is not counted
    _, two = peak_tensor_bytes(lambda t: (t * 2) * 3, x)
    assert two == 8000  # the temporary t * 2 is alive while (t * 2) * 3 is computed, then freed
    _, views = peak_tensor_bytes(lambda t: (t * 2).view(10, 100).t(), x)
    assert views == 4000  # views share one storage


def test_memory_of_the_math_path_is_quadratic_and_of_the_tiled_path_linear():
    def peak(fn, t):
        q, k, v = qkv(1, 2, t, t, 16, dtype=torch.float32)
        with torch.no_grad():
            return peak_tensor_bytes(fn, q, k, v)[1]

    def math_path(q, k, v):
        return scaled_dot_product_attention(q, k, v, is_causal=True)

    def tiled(q, k, v):
        return tiled_attention(q, k, v, is_causal=True, block_q=32, block_k=32)

    for t in (256, 512):
        assert 3.5 < peak(math_path, 2 * t) / peak(math_path, t) < 4.1
        assert peak(tiled, 2 * t) / peak(tiled, t) < 2.1
    # the (B, H, T, T) scores alone: 2 * 512 * 512 * 4 bytes
    assert peak(math_path, 512) > 2 * 512 * 512 * 4 > 5 * peak(tiled, 512)
