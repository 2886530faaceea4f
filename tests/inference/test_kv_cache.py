"""The preallocated KV cache: in-place writes and views, the same tokens as no cache and as the concatenating
reference cache, batched left-padded prompts equal to one-by-one decoding, grouped-query and multi-query Llama,
crop / reorder, and its errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from companion.inference import GenerationConfig, PreallocatedKVCache, allocate_kv_caches, generate
from companion.models import GPT, GPTConfig, Llama, LlamaConfig, greedy_generate
from companion.nn.attention import KVCache


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig.tiny())
    elif kind == "llama_gqa":  # 4 query heads share 2 key/value heads
        model = Llama(LlamaConfig.tiny())
    else:  # multi-query: one key/value head
        model = Llama(replace(LlamaConfig.tiny(), n_kv_heads=1))
    with torch.no_grad():  # larger weights than the init: sharper logits, no near-ties in argmax
        for p in model.parameters():
            p.mul_(8.0) if p.dim() > 1 else None
    return model.eval().double()


KINDS = ["gpt", "llama_gqa", "llama_mqa"]


def test_update_writes_in_place_and_returns_views():
    cache = PreallocatedKVCache(2, 3, 10, 4, dtype=torch.float64)
    k1, v1 = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    k2, v2 = torch.randn(2, 3, 1, 4, dtype=torch.float64), torch.randn(2, 3, 1, 4, dtype=torch.float64)
    ref = KVCache()
    ref.update(k1, v1)
    cache.update(k1, v1)
    keys, values = cache.update(k2, v2)
    ref_k, ref_v = ref.update(k2, v2)
    assert cache.seq_len == 5 and torch.equal(keys, ref_k) and torch.equal(values, ref_v)
    assert keys.data_ptr() == cache.k.data_ptr()  # a view of the buffer, not a copy
    assert cache.nbytes == 2 * 2 * 3 * 10 * 4 * 8
    cache.crop(2)
    keys, _ = cache.update(k2, v2)
    assert cache.seq_len == 3 and torch.equal(keys, torch.cat([k1[:, :, :2], k2], dim=2))
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.k[0], cache.k[1]) and torch.equal(cache.k[0, :, :3], keys[1])


@pytest.mark.parametrize("kind", KINDS)
def test_allocate_matches_the_model(kind):
    model = _model(kind)
    caches = allocate_kv_caches(model, 3, 20)
    attn = model.blocks[0].self_attn.config
    assert len(caches) == model.config.n_layers
    assert caches[0].k.shape == (3, attn.kv_heads, 20, attn.head_dim) and caches[0].k.dtype == torch.float64


@pytest.mark.parametrize("kind", KINDS)
def test_cached_equals_uncached_and_reference(kind):
    model = _model(kind)
    ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    cached = generate(model, ids, config=GenerationConfig(max_new_tokens=20))
    uncached = generate(model, ids, config=GenerationConfig(max_new_tokens=20, use_cache=False))
    assert torch.equal(cached.sequences, uncached.sequences)
    assert torch.equal(cached.sequences, greedy_generate(model, ids, 20))  # the chapter 5 reference
    caches = allocate_kv_caches(model, 2, 25)  # and the logits agree step by step with a full forward pass
    with torch.no_grad():
        seq = cached.sequences
        step = [model(seq[:, :5], kv_caches=caches)[:, -1]]
        step += [model(seq[:, i:i + 1], kv_caches=caches)[:, -1] for i in range(5, 24)]
        full = model(seq[:, :24])[:, 4:]
    torch.testing.assert_close(torch.stack(step, dim=1), full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_batched_left_padded_equals_one_by_one(kind):
    model = _model(kind)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(1, 256, (n,), generator=g) for n in (7, 3, 5, 1)]
    t = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), t, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, t - len(p):], mask[row, t - len(p):] = p, 1
    for config in (GenerationConfig(max_new_tokens=15), GenerationConfig(max_new_tokens=15, do_sample=False,
                                                                            repetition_penalty=1.5)):
        batched = generate(model, ids, mask, config)
        for row, p in enumerate(prompts):
            alone = generate(model, p[None], config=config)
            assert batched.new_tokens[row] == alone.new_tokens[0], (kind, row)


def test_errors():
    with pytest.raises(ValueError, match="max_len must be positive, got 0"):
        PreallocatedKVCache(1, 1, 0, 4)
    cache = PreallocatedKVCache(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"k and v must have shape \(B, G, T, D\) = \(1, 2, T, 8\), got \(1, 4, 1, 8\)"):
        cache.update(torch.zeros(1, 4, 1, 8), torch.zeros(1, 4, 1, 8))
    cache.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))
    with pytest.raises(ValueError, match=r"cache full: 3 cached \+ 2 new positions exceed max_len=4"):
        cache.update(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match=r"can only crop to 0 .. seq_len=3 positions, got 5"):
        cache.crop(5)
    with pytest.raises(ValueError, match=r"index must have shape \(1,\), got \(2,\)"):
        cache.reorder(torch.tensor([0, 0]))
    with pytest.raises(ValueError, match="max_len=65 exceeds the model's context length n_ctx=64"):
        allocate_kv_caches(_model("gpt"), 1, 65)
    with pytest.raises(TypeError, match="needs a model with .blocks"):
        allocate_kv_caches(torch.nn.Linear(2, 2), 1, 4)
