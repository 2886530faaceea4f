"""QK-norm and sliding-window attention (against explicit masks and transformers' Qwen3/Mistral), KV-cache sizes."""

from dataclasses import replace

import pytest
import torch

from companion.models.hf import load_hf_state_dict
from companion.models.llama import Llama, LlamaConfig
from companion.nn.attention import (
    AttentionConfig,
    KVCache,
    MultiHeadAttention,
    causal_mask,
    kv_cache_bytes_per_token,
    scaled_dot_product_attention,
    sliding_window_mask,
)


def _banded(t: int, s: int, window: int) -> torch.Tensor:
    """The sliding-window mask by its definition, one entry at a time: query i sits at position s - t + i."""
    return torch.tensor([[0 <= (s - t + i) - j < window for j in range(s)] for i in range(t)])


@pytest.mark.parametrize("t, s, window", [(6, 6, 1), (6, 6, 3), (6, 6, 6), (6, 6, 10), (2, 7, 3), (1, 9, 4)])
def test_sliding_window_mask_is_the_band(t, s, window):
    assert torch.equal(sliding_window_mask(t, s, window=window), _banded(t, s, window))
    if window >= s:  # a window as long as the sequence is the plain causal mask
        assert torch.equal(sliding_window_mask(t, s, window=window), causal_mask(t, s))


@pytest.mark.parametrize("backend", ["math", "torch"])
def test_windowed_attention_equals_explicit_banded_mask(backend):
    torch.manual_seed(0)
    cfg = AttentionConfig(d_model=32, n_heads=4, n_kv_heads=2, causal=True, positional="rope", window=3,
                          backend=backend)
    attn = MultiHeadAttention(cfg).double().eval()
    plain = MultiHeadAttention(replace(cfg, window=None, causal=False)).double().eval()
    plain.load_state_dict(attn.state_dict())
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    out, _ = attn(x)
    expected, _ = plain(x, mask=_banded(9, 9, 3))
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    causal, _ = MultiHeadAttention(replace(cfg, window=None)).double().eval().requires_grad_(False)(x)
    assert (out - causal).abs().max() > 1e-3  # the window does change the result


def test_window_keys_older_than_the_window_can_be_dropped_from_the_cache():
    # With a window W, keys more than W - 1 positions back get weight 0: decoding with a cache that keeps only the
    # last W - 1 entries (Mistral's rolling buffer) gives the same outputs as a full cache and as one full pass.
    torch.manual_seed(0)
    w = 4
    attn = MultiHeadAttention(AttentionConfig(d_model=32, n_heads=4, causal=True, positional="rope", window=w,
                                              backend="math")).double().eval()
    x = torch.randn(1, 10, 32, dtype=torch.float64)
    full, _ = attn(x)
    whole, rolling = KVCache(), KVCache()
    for t in range(10):
        step, _ = attn(x[:, t : t + 1], kv_cache=whole)
        positions = torch.tensor([t])
        short, _ = attn(x[:, t : t + 1], kv_cache=rolling, positions=positions)
        rolling.k, rolling.v = rolling.k[:, :, -(w - 1):], rolling.v[:, :, -(w - 1):]  # keep the last W - 1 keys
        torch.testing.assert_close(step, full[:, t : t + 1], rtol=0, atol=1e-12)
        torch.testing.assert_close(short, full[:, t : t + 1], rtol=0, atol=1e-12)
    assert whole.seq_len == 10 and rolling.seq_len == w - 1


def test_qk_norm_normalises_each_head_before_rope():
    torch.manual_seed(0)
    cfg = AttentionConfig(d_model=32, n_heads=4, causal=True, positional="rope", qk_norm=True, backend="math")
    attn = MultiHeadAttention(cfg).double().eval()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5), attn.k_norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    q = attn.q_proj(x).view(2, 5, 4, 8).transpose(1, 2)  # (B, H, T, D)
    k = attn.k_proj(x).view(2, 5, 4, 8).transpose(1, 2)
    v = attn.v_proj(x).view(2, 5, 4, 8).transpose(1, 2)

    def rms(z, w):
        return z / z.pow(2).mean(-1, keepdim=True).add(cfg.qk_norm_eps).sqrt() * w

    pos = torch.arange(5)
    q, k = attn.rope(rms(q, attn.q_norm.weight), pos), attn.rope(rms(k, attn.k_norm.weight), pos)
    expected = attn.out_proj(scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(2, 5, 32))
    torch.testing.assert_close(attn(x)[0], expected, rtol=0, atol=1e-12)
    assert not any("norm" in n for n, _ in MultiHeadAttention(replace(cfg, qk_norm=False)).named_parameters())


def _hf_llama_like(kind: str, ours: LlamaConfig, layer_types: list[str] | None = None):
    import transformers as tr

    c = ours
    common = dict(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff, num_hidden_layers=c.n_layers,
                  num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.n_ctx,
                  rms_norm_eps=c.norm_eps, tie_word_embeddings=False, sliding_window=c.sliding_window,
                  rope_parameters={"rope_type": "default", "rope_theta": c.rope_base})
    if kind == "qwen3":
        config = tr.Qwen3Config(head_dim=c.head_dim, use_sliding_window=True, layer_types=layer_types, **common)
        model = tr.Qwen3ForCausalLM(config)
    else:
        model = tr.MistralForCausalLM(tr.MistralConfig(head_dim=c.head_dim, **common))
    return model.eval()


def _load(ours: Llama, theirs) -> Llama:
    sd = dict(theirs.state_dict())
    norms = {k: sd.pop(k) for k in list(sd) if ".q_norm." in k or ".k_norm." in k}
    load_hf_state_dict(ours, sd)
    with torch.no_grad():
        for k, v in norms.items():  # model.layers.i.self_attn.q_norm.weight -> blocks.i.self_attn.q_norm.weight
            ours.get_parameter(k.replace("model.layers.", "blocks.")).copy_(v)
    return ours.eval()


def test_llama_with_qk_norm_and_local_global_layers_matches_transformers_qwen3():
    torch.manual_seed(0)
    ours_cfg = LlamaConfig(vocab_size=64, n_ctx=32, n_layers=4, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                           norm_eps=1e-6, qk_norm=True, sliding_window=4, global_every=2)
    types = ["full_attention" if ours_cfg.window(i) is None else "sliding_attention" for i in range(4)]
    assert types == ["sliding_attention", "full_attention"] * 2
    theirs = _hf_llama_like("qwen3", ours_cfg, types)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    ours = _load(Llama(ours_cfg), theirs)
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    expected = theirs(idx).logits
    torch.testing.assert_close(ours(idx), expected, rtol=1e-5, atol=1e-5)
    for other in (replace(ours_cfg, global_every=None), replace(ours_cfg, sliding_window=None, global_every=None)):
        assert (_load(Llama(other), theirs)(idx) - expected).abs().max() > 1e-3  # the layer pattern matters


def test_llama_with_sliding_window_matches_transformers_mistral():
    torch.manual_seed(0)
    ours_cfg = LlamaConfig(vocab_size=64, n_ctx=32, n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                           norm_eps=1e-6, sliding_window=5)
    theirs = _hf_llama_like("mistral", ours_cfg)
    ours = _load(Llama(ours_cfg), theirs)
    idx = torch.randint(0, 64, (2, 20), generator=torch.Generator().manual_seed(1))
    expected = theirs(idx).logits
    torch.testing.assert_close(ours(idx), expected, rtol=1e-5, atol=1e-5)
    assert (_load(Llama(replace(ours_cfg, sliding_window=None)), theirs)(idx) - expected).abs().max() > 1e-3


def test_global_every_six_is_gemma3s_five_local_to_one_global():
    from transformers import Gemma3TextConfig

    theirs = Gemma3TextConfig(num_hidden_layers=12).layer_types
    ours = LlamaConfig(n_layers=12, sliding_window=1024, global_every=6)
    assert ["full_attention" if ours.window(i) is None else "sliding_attention" for i in range(12)] == theirs
    assert sum(ours.window(i) is not None for i in range(12)) == 10  # 5 : 1


def test_kv_cache_bytes_per_token_hand_computed():
    def layer(h, g, d, window=None):
        return AttentionConfig(d_model=h * d, n_heads=h, n_kv_heads=g, causal=True, window=window)

    # per layer and token: 2 (K and V) * G * D numbers
    assert kv_cache_bytes_per_token([layer(32, 32, 128)] * 32, torch.float16) == 2 * 32 * 128 * 32 * 2 == 524288
    assert kv_cache_bytes_per_token([layer(32, 8, 128)] * 32, torch.bfloat16) == 131072  # Llama 3 8B (GQA, 8 groups)
    assert kv_cache_bytes_per_token(layer(32, 1, 128), torch.float32) == 2 * 128 * 4  # MQA, one layer
    assert kv_cache_bytes_per_token(layer(32, 8, 128), torch.float8_e4m3fn) == 2 * 8 * 128
    mistral = [layer(32, 8, 128, window=4096)] * 32  # Mistral 7B: window 4096
    assert kv_cache_bytes_per_token(mistral, torch.bfloat16, context=4096) == 131072  # the window does not bind yet
    assert kv_cache_bytes_per_token(mistral, torch.bfloat16, context=32768) == 131072 / 8  # keeps 4096 of 32768
    assert kv_cache_bytes_per_token(mistral, torch.bfloat16) == 131072  # without a context: every token's cost
    mixed = [layer(8, 4, 64, window=16)] * 5 + [layer(8, 4, 64)]  # 5 local : 1 global at context 64
    assert kv_cache_bytes_per_token(mixed, torch.bfloat16, context=64) == 2 * 4 * 64 * 2 * (5 * 16 / 64 + 1)


def test_variant_errors_name_the_values():
    with pytest.raises(ValueError, match="needs causal=True, got causal=False with window=4"):
        AttentionConfig(d_model=32, n_heads=4, window=4)
    with pytest.raises(ValueError, match="window must be a positive int"):
        AttentionConfig(d_model=32, n_heads=4, causal=True, window=0)
    with pytest.raises(ValueError, match="window must be a positive number of keys, got 0"):
        sliding_window_mask(3, window=0)
    with pytest.raises(ValueError, match="global_every needs a sliding_window"):
        LlamaConfig.tiny().__class__(global_every=6)
    with pytest.raises(ValueError, match="context must be a positive number of tokens, got 0"):
        kv_cache_bytes_per_token(AttentionConfig(d_model=32, n_heads=4), context=0)
