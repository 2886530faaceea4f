"""Multi-head latent attention against transformers' DeepseekV3Attention, its absorbed form, its cache and size."""

import pytest
import torch
from einops import rearrange

from companion.nn.attention import KVCache, kv_cache_bytes_per_token
from companion.nn.mla import MLAConfig, MultiHeadLatentAttention

H, DH, DR, DV, DC = 4, 8, 4, 6, 16


def _ours(q_rank: int | None, **kw) -> MultiHeadLatentAttention:
    torch.manual_seed(0)
    cfg = MLAConfig(d_model=32, n_heads=H, kv_rank=DC, q_rank=q_rank, head_dim=DH, rope_dim=DR, v_head_dim=DV,
                    rope_base=500.0, backend="math", **kw)
    mla = MultiHeadLatentAttention(cfg).double().eval()
    with torch.no_grad():  # non-trivial norm gains, so that a missing or misplaced norm is seen
        for p in mla.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return mla


def _interleave(w: torch.Tensor, heads: int, nope: int) -> torch.Tensor:
    """Rows of the rotate-half RoPE layout (i, i + d/2) rearranged into DeepSeek's interleaved pairs (2i, 2i + 1)."""
    w = rearrange(w, "(h e) c -> h e c", h=heads)
    rope = w[:, nope:]
    half = rope.shape[1] // 2
    pairs = torch.stack([rope[:, :half], rope[:, half:]], dim=2)  # (h, d/2, 2, c)
    return rearrange(torch.cat([w[:, :nope], rearrange(pairs, "h i two c -> h (i two) c")], dim=1), "h e c -> (h e) c")


def _theirs(ours: MultiHeadLatentAttention, interleave: bool):
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    c = ours.config
    config = DeepseekV3Config(hidden_size=c.d_model, num_attention_heads=H, num_key_value_heads=H, q_lora_rank=c.q_rank,
                              kv_lora_rank=DC, qk_nope_head_dim=DH, qk_rope_head_dim=DR, v_head_dim=DV,
                              rope_interleave=interleave, attention_bias=False, rms_norm_eps=c.norm_eps,
                              rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
                              num_hidden_layers=1, vocab_size=16, max_position_embeddings=64)
    config._attn_implementation = "sdpa"  # eager attention takes its softmax in float32
    attn = DeepseekV3Attention(config, layer_idx=0).double().eval()
    for name in ("q_a_layernorm", "kv_a_layernorm"):  # their RMSNorm computes in float32: the same formula in float64
        norm = getattr(attn, name)
        if norm is not None:
            norm.forward = lambda h, n=norm: n.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True)
                                                                          + n.variance_epsilon))
    kv_a = ours.kv_down.weight
    if interleave:
        kv_a = _interleave(kv_a, 1, DC)
    sd = {"kv_a_proj_with_mqa.weight": kv_a, "kv_a_layernorm.weight": ours.kv_norm.weight,
          "kv_b_proj.weight": rearrange(torch.cat([rearrange(ours.k_up.weight, "(h d) c -> h d c", h=H),
                                                   rearrange(ours.v_up.weight, "(h d) c -> h d c", h=H)], dim=1),
                                        "h e c -> (h e) c"),
          "o_proj.weight": ours.out_proj.weight}
    q = ours.q_proj.weight if c.q_rank is None else ours.q_up.weight
    q = _interleave(q, H, DH) if interleave else q
    if c.q_rank is None:
        sd["q_proj.weight"] = q
    else:
        sd.update({"q_a_proj.weight": ours.q_down.weight, "q_a_layernorm.weight": ours.q_norm.weight,
                   "q_b_proj.weight": q})
    attn.load_state_dict(sd)
    return attn, DeepseekV3RotaryEmbedding(config).double()


@pytest.mark.parametrize("q_rank", [None, 12])
@pytest.mark.parametrize("interleave", [False, True])
def test_mla_matches_transformers_deepseek_v3(q_rank, interleave):
    # float64 end to end: the same function within 1e-12. DeepSeek's interleaved RoPE pairs (2i, 2i+1) are a fixed
    # permutation of our rotate-half pairs (i, i + d/2): permuting the rope rows of the weights gives the same output.
    ours = _ours(q_rank)
    theirs, rotary = _theirs(ours, interleave)
    x = torch.randn(2, 7, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    position_ids = torch.arange(7)[None].expand(2, -1)
    mask = torch.full((7, 7), torch.finfo(torch.float64).min, dtype=torch.float64).triu(1)[None, None]
    # transformers builds cos/sin in float32 even for float64 models; the float64 tables (ours) are within 1e-6 of
    # them and are given to both, so that the comparison is float64 throughout.
    cos, sin = ours.rope.cos_sin(position_ids, torch.float64)
    for mine, hf in zip((cos, sin), rotary(x, position_ids)):
        torch.testing.assert_close(mine, hf, rtol=0, atol=1e-6)
    expected, _ = theirs(x, (cos, sin), mask)
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours(x, absorb=True), expected, rtol=0, atol=1e-12)
    wrong = _ours(q_rank, scale=1.0 / DH ** 0.5)  # 1/sqrt(d_h) instead of 1/sqrt(d_h + d_R): must be detected
    assert (wrong(x) - expected).abs().max() > 1e-4


def test_absorbed_form_equals_naive_form_and_caches_only_latents():
    mla = _ours(None)
    x = torch.randn(1, 9, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    full = mla(x)
    torch.testing.assert_close(mla(x, absorb=True), full, rtol=0, atol=1e-12)
    for absorb in (False, True):  # prefill 5 tokens, then decode 4 one by one: the same outputs as one pass
        cache = KVCache()
        steps = [mla(x[:, :5], kv_cache=cache, absorb=absorb)] + [
            mla(x[:, t : t + 1], kv_cache=cache, absorb=absorb) for t in range(5, 9)]
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-12)
        assert cache.k.shape == (1, 1, 9, DC) and cache.v.shape == (1, 1, 9, DR)  # latent and shared RoPE key only


def test_mla_cache_size_is_the_papers():
    # DeepSeek-V2 (Table 1 and section 2.1.4): MLA caches (d_c + d_h^R) l elements per token, with d_c = 4 d_h and
    # d_h^R = d_h / 2 this is 9/2 d_h l, "equal to GQA with only 2.25 groups"; MHA caches 2 n_h d_h l.
    v2 = MLAConfig.deepseek_v2()
    layers, d_h, n_h = 60, v2.head_dim, v2.n_heads
    assert v2.kv_rank == 4 * d_h and v2.rope_dim == d_h // 2
    assert kv_cache_bytes_per_token([v2] * layers, torch.float32) / 4 == 4.5 * d_h * layers == 34560
    mha = 2 * n_h * d_h * layers
    assert 4.5 * d_h * layers == 2 * 2.25 * d_h * layers and mha / (4.5 * d_h * layers) == pytest.approx(56.9, abs=0.1)
    assert kv_cache_bytes_per_token([MLAConfig.deepseek_v3()] * 61, torch.bfloat16) == 576 * 61 * 2  # 70 272 bytes


def test_mla_config_errors_name_the_values():
    with pytest.raises(ValueError, match="kv_rank must be positive, got 0"):
        MLAConfig(d_model=32, n_heads=4, kv_rank=0)
    with pytest.raises(ValueError, match="even rope_dim, got 5"):
        MLAConfig(d_model=32, n_heads=4, kv_rank=8, rope_dim=5)
    with pytest.raises(ValueError, match=r"x must have shape \(B, T, 32\), got \(1, 3, 8\)"):
        _ours(None)(torch.zeros(1, 3, 8, dtype=torch.float64))
