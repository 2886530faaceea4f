"""The fused output head (`linear_cross_entropy`, `fused_causal_lm_loss`, ``GPT(..., labels=)``) against the plain
head: logits from ``F.linear``, then `causal_lm_loss` / ``F.cross_entropy``. Loss and gradients agree to float64
rounding (1e-12) in float64, to float32 rounding in float32, and to bf16 rounding under autocast; memory: the head
saves d hidden and d weight, not the (N, V) log-softmax."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from companion.models import GPT, GPTConfig, Llama, LlamaConfig
from companion.objectives import (IGNORE_INDEX, causal_lm_loss, default_chunk_rows, fused_causal_lm_loss,
                                  linear_cross_entropy)


def _case(dtype: torch.dtype = torch.float64, b: int = 3, t: int = 11, c: int = 16, v: int = 53):
    g = torch.Generator().manual_seed(0)
    hidden = (3 * torch.randn(b, t, c, generator=g, dtype=torch.float64)).to(dtype).requires_grad_()
    weight = torch.randn(v, c, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    labels = torch.randint(v, (b, t), generator=g)
    labels[0, 4:7] = IGNORE_INDEX  # padding inside a row
    return hidden, weight, labels


def _grads(loss: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, tensors)


@pytest.mark.parametrize("chunk_rows", [1, 4, 7, 1000])  # chunks that divide N, that do not, and one chunk
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-2])
def test_equals_the_plain_head_in_float64(chunk_rows, reduction, z_loss):
    hidden, weight, labels = _case()
    ours = fused_causal_lm_loss(hidden, weight, labels, reduction=reduction, z_loss=z_loss, chunk_rows=chunk_rows)
    plain = causal_lm_loss(F.linear(hidden, weight), labels, reduction=reduction, z_loss=z_loss)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, plain, rtol=1e-12, atol=1e-12)
    for a, b in zip(_grads(2.5 * ours, hidden, weight), _grads(2.5 * plain, hidden, weight)):  # an upstream scale
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradcheck():
    hidden, weight, labels = _case(b=2, t=5, c=6, v=9)
    assert torch.autograd.gradcheck(
        lambda h, w: linear_cross_entropy(h, w, labels, z_loss=0.1, chunk_rows=3), (hidden, weight))


def test_float32_and_bf16_autocast_agree_with_the_plain_head():
    hidden, weight, labels = _case(torch.float32, b=4, t=64, c=32, v=300)
    ours, plain = fused_causal_lm_loss(hidden, weight, labels), causal_lm_loss(F.linear(hidden, weight), labels)
    torch.testing.assert_close(ours, plain, rtol=1e-6, atol=1e-6)
    for a, b in zip(_grads(ours, hidden, weight), _grads(plain, hidden, weight)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, plain = fused_causal_lm_loss(hidden, weight, labels), causal_lm_loss(F.linear(hidden, weight), labels)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, plain, rtol=1e-3, atol=1e-3)  # the same bf16 logits, summed in another order
    for a, b in zip(_grads(ours, hidden, weight), _grads(plain, hidden, weight)):
        assert a.dtype == b.dtype == torch.float32
        assert ((a - b).norm() / b.norm()).item() < 1e-2  # bf16 has 8 bits: relative error ~ 2^-8 per product


def test_float16_autocast_does_not_flush_the_mean_to_zero():
    # N = 16,320 rows of near-uniform softmax: d loss / d logits = (p - onehot) / N is ~2e-7, below float16's
    # smallest normal (6e-5). Scaled before the float16 products it loses its bits (relative error 7e-3 measured);
    # the mean must scale after them (3e-4)
    hidden, weight, labels = _case(torch.float32, b=64, t=256, c=32, v=300)
    with torch.no_grad():
        weight.mul_(0.05)
    with torch.autocast("cpu", dtype=torch.float16):
        ours = fused_causal_lm_loss(hidden, weight, labels)
    reference = causal_lm_loss(F.linear(hidden, weight), labels)  # float32
    torch.testing.assert_close(ours, reference, rtol=1e-3, atol=1e-3)
    for a, b in zip(_grads(ours, hidden, weight), _grads(reference, hidden, weight)):
        assert ((a - b).norm() / b.norm()).item() < 2e-3  # float16 has 11 bits


def test_micro_batches_accumulate_in_grad():
    hidden, weight, labels = _case(torch.float32, b=4, t=16, c=8, v=40)
    for part in (slice(0, 2), slice(2, 4)):  # two backward passes into the same .grad
        (0.5 * fused_causal_lm_loss(hidden[part], weight, labels[part])).backward()
        fused_causal_lm_loss(hidden[part], weight, labels[part]).backward()
    ours = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    for part in (slice(0, 2), slice(2, 4)):
        (1.5 * causal_lm_loss(F.linear(hidden[part], weight), labels[part])).backward()
    for a, b in zip(ours, (hidden.grad, weight.grad)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_no_gradients_formed_without_grad():
    hidden, weight, labels = _case()
    with torch.no_grad():
        loss = fused_causal_lm_loss(hidden, weight, labels)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, causal_lm_loss(F.linear(hidden, weight), labels).detach(), rtol=1e-12, atol=0)
    frozen = weight.detach()  # only the hidden states need a gradient: d weight is not formed
    (g,) = _grads(fused_causal_lm_loss(hidden, frozen, labels), hidden)
    torch.testing.assert_close(g, _grads(causal_lm_loss(F.linear(hidden, frozen), labels), hidden)[0])


def test_memory_is_d_hidden_and_d_weight_not_the_logits():
    hidden, weight, labels = _case(torch.float32, b=2, t=64, c=8, v=1000)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        fused_causal_lm_loss(hidden, weight, labels)
    assert sorted(tuple(t.shape) for t in saved) == [(8 * 2 * 64 // 8, 8), (1000, 8)]  # (N, C) and (V, C)
    assert default_chunk_rows(8000) == 262 and default_chunk_rows(10**7) == 16 and default_chunk_rows(10) == 1024


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_model_labels_give_the_loss_of_its_logits(kind):
    torch.manual_seed(0)
    model = GPT(GPTConfig.tiny()) if kind == "gpt" else Llama(replace(LlamaConfig.tiny(), tie_embeddings=False))
    ids = torch.randint(model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[1, :3] = IGNORE_INDEX
    fused = model(ids, labels=labels, z_loss=1e-3)
    plain = causal_lm_loss(model(ids), labels, z_loss=1e-3)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    params = [p for p in model.parameters()]
    for a, b in zip(_grads(fused, *params), _grads(plain, *params)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_errors_name_the_value():
    hidden, weight, labels = _case()
    with pytest.raises(ValueError, match=r"hidden \(3, 11, 16\) and labels \(3, 10\)"):
        linear_cross_entropy(hidden, weight, labels[:, 1:])
    with pytest.raises(ValueError, match=r"weight must be \(V, 16\), got shape \(53, 15\)"):
        linear_cross_entropy(hidden, weight[:, 1:], labels)
    with pytest.raises(ValueError, match="reduction must be 'mean' or 'sum', got 'max'"):
        linear_cross_entropy(hidden, weight, labels, reduction="max")
    with pytest.raises(ValueError, match="chunk_rows must be positive, got 0"):
        linear_cross_entropy(hidden, weight, labels, chunk_rows=0)
    with pytest.raises(ValueError, match="every label equals ignore_index=-100"):
        linear_cross_entropy(hidden, weight, torch.full_like(labels, IGNORE_INDEX))
    with pytest.raises(ValueError, match="at least 2 positions"):
        fused_causal_lm_loss(hidden[:, :1], weight, labels[:, :1])
    with pytest.raises(ValueError, match=r"expects hidden \(B, T, C\) and labels \(B, T\)"):
        fused_causal_lm_loss(hidden[0], weight, labels[0])


def test_a_wrapped_head_falls_back_to_its_logits():
    from companion.finetuning import LoRAConfig, apply_lora

    torch.manual_seed(0)
    model = apply_lora(GPT(replace(GPTConfig.tiny(), tie_embeddings=False)), LoRAConfig(targets=("lm_head",)))
    with torch.no_grad():
        model.lm_head.lora_B.normal_()  # a nonzero update: the plain weight alone would give another loss
    ids = torch.randint(model.config.vocab_size, (2, 12))
    loss = model(ids, labels=ids)
    torch.testing.assert_close(loss, causal_lm_loss(model(ids), ids))
    plain = causal_lm_loss(F.linear(model.features(ids), model.lm_head.weight), ids)  # without the LoRA update
    assert (loss - plain).abs() > 1e-3
