"""RoPE context extension: NTK-aware (static and dynamic) and YaRN against transformers' ROPE_INIT_FUNCTIONS, their
formulas in float64, and a Llama loaded from a transformers checkpoint that uses them."""

import math

import pytest
import torch
import transformers as tr
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from companion.models import Llama, from_pretrained, greedy_generate
from companion.models.hf import config_from_hf, save_pretrained
from companion.nn.positional import RopeScaling, RotaryEmbedding, rope_frequencies

tr.logging.set_verbosity_error()


def _hf_config(head_dim: int, theta: float, max_pos: int, **rope) -> tr.LlamaConfig:
    return tr.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, num_hidden_layers=1, vocab_size=16,
                          max_position_embeddings=max_pos, rope_parameters={"rope_theta": theta, **rope})


YARN = [  # (head_dim, theta, HF fields, ours): defaults, other betas, no truncation with an explicit attention factor
    (16, 1e4, {"factor": 4.0, "original_max_position_embeddings": 32}, RopeScaling.yarn(4.0, 32)),
    (64, 5e5, {"factor": 8.0, "original_max_position_embeddings": 1024, "beta_fast": 16, "beta_slow": 2},
     RopeScaling.yarn(8.0, 1024, 16, 2)),
    (32, 1e4, {"factor": 2.0, "original_max_position_embeddings": 64, "truncate": False, "attention_factor": 1.3},
     RopeScaling.yarn(2.0, 64, truncate=False, attention_factor=1.3)),
    (128, 1e4, {"factor": 40.0, "original_max_position_embeddings": 4096}, RopeScaling.yarn(40.0, 4096)),  # DeepSeek-V3's
]


@pytest.mark.parametrize("case", range(len(YARN)))
def test_yarn_matches_transformers(case):
    d, theta, fields, ours = YARN[case]
    config = _hf_config(d, theta, int(fields["original_max_position_embeddings"] * fields["factor"]), rope_type="yarn",
                        **fields)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    assert torch.equal(rope_frequencies(d, theta, ours), inv_freq)  # float32, the same operations: bit for bit
    assert ours.attention_scaling == attention_factor
    if "attention_factor" not in fields:  # the paper's sqrt(1/t) = 0.1 ln(s) + 1
        assert attention_factor == pytest.approx(0.1 * math.log(fields["factor"]) + 1, rel=1e-15)
    plain = rope_frequencies(d, theta)
    assert inv_freq[0] == plain[0] and inv_freq[-1].item() == pytest.approx(plain[-1].item() / fields["factor"], rel=1e-6)


@pytest.mark.parametrize("factor", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("seq_len", [16, 32, 33, 100, 1000])
def test_dynamic_ntk_matches_transformers(factor, seq_len):
    config = _hf_config(16, 1e4, 32, rope_type="dynamic", factor=factor)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=seq_len)
    ours = rope_frequencies(16, 1e4, RopeScaling.dynamic(factor, 32), seq_len=seq_len)
    assert torch.equal(ours, inv_freq) and attention_factor == 1.0
    assert torch.equal(ours, rope_frequencies(16, 1e4)) == (seq_len <= 32)  # no change inside the original length


@pytest.mark.parametrize("alpha", [2.0, 4.0, 8.0])
def test_static_ntk_is_dynamic_ntk_at_a_fixed_length(alpha):
    # the dynamic stretch with factor 1 at length alpha * original is alpha: the static rule base * alpha^(D/(D-2))
    config = _hf_config(16, 1e4, 32, rope_type="dynamic", factor=1.0)
    inv_freq, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, "cpu", seq_len=int(alpha * 32))
    assert torch.equal(rope_frequencies(16, 1e4, RopeScaling.ntk(alpha)), inv_freq)
    ntk = rope_frequencies(64, 1e4, RopeScaling.ntk(alpha), torch.float64)
    plain = rope_frequencies(64, 1e4, dtype=torch.float64)
    assert ntk[0] == plain[0] == 1.0  # the fastest rotation is kept (extrapolation) ...
    assert ntk[-1].item() == pytest.approx(plain[-1].item() / alpha, rel=1e-12)  # ... the slowest divided by alpha
    ratio = (plain / ntk).log() / math.log(alpha)
    assert bool((ratio[1:] > ratio[:-1]).all())  # and the division grows smoothly from fast to slow dimensions


@pytest.mark.parametrize("name", ["yarn", "dynamic"])
def test_rotary_embedding_matches_transformers_llama_rotary(name):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    if name == "yarn":
        config, ours = _hf_config(16, 1e4, 128, rope_type="yarn", factor=4.0, original_max_position_embeddings=32), \
            RopeScaling.yarn(4.0, 32)
    else:
        config, ours = _hf_config(16, 1e4, 32, rope_type="dynamic", factor=2.0), RopeScaling.dynamic(2.0, 32)
    rope = RotaryEmbedding(16, 1e4, scaling=ours)
    x = torch.randn(1, 4, 100, 16)
    for positions in (torch.arange(20), torch.arange(100)):  # inside, then beyond the original 32 positions
        theirs = LlamaRotaryEmbedding(config)(x, positions[None])
        for mine, hf in zip(rope.cos_sin(positions), theirs):
            torch.testing.assert_close(mine, hf[0], rtol=0, atol=1e-6)
    cos, _ = rope.cos_sin(torch.arange(1))
    assert cos[0, 0].item() == pytest.approx(ours.attention_scaling, rel=1e-7)  # cos(0) carries the YaRN factor


def test_yarn_temperature_scales_the_logits_by_the_square_of_its_factor():
    s = RopeScaling.yarn(16.0, 64)
    yarn, plain = RotaryEmbedding(32, scaling=s).double(), RotaryEmbedding(32).double()
    q, k = torch.randn(1, 1, 1, 32, dtype=torch.float64), torch.randn(1, 1, 1, 32, dtype=torch.float64)
    p = torch.tensor([7])
    logit = (yarn(q, p) * yarn(k, p)).sum()  # same position: the rotation cancels, only the factor remains
    torch.testing.assert_close(logit, (plain(q, p) * plain(k, p)).sum() * (0.1 * math.log(16) + 1) ** 2, rtol=1e-13,
                               atol=0)


def test_scaling_validation_names_values():
    with pytest.raises(ValueError, match="need 0 < beta_slow < beta_fast, got beta_slow=32.0 and beta_fast=1.0"):
        RopeScaling.yarn(4.0, 32, beta_fast=1.0, beta_slow=32.0)
    with pytest.raises(ValueError, match="attention_factor must be positive"):
        RopeScaling.yarn(4.0, 32, attention_factor=0.0)


# ------------------------------------------------------------------------- a Llama checkpoint that uses them
def _llama(rope_type: str, **fields):
    torch.manual_seed(0)
    max_pos = 64 if rope_type == "yarn" else 16
    model = tr.LlamaForCausalLM(tr.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                               num_key_value_heads=2, intermediate_size=80, vocab_size=97,
                                               max_position_embeddings=max_pos, bos_token_id=0, eos_token_id=0,
                                               pad_token_id=0,
                                               rope_parameters={"rope_type": rope_type, "rope_theta": 1e4, **fields}))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.25)  # big enough activations for RoPE to matter
    return model.eval()


CHECKPOINTS = {
    "yarn": ({"factor": 4.0, "original_max_position_embeddings": 16}, RopeScaling.yarn(4.0, 16)),
    "dynamic": ({"factor": 4.0}, RopeScaling.dynamic(4.0, 16)),
    "yarn-deepseek": ({"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0, "mscale_all_dim": 0.5},
                      RopeScaling.yarn(4.0, 16, attention_factor=(0.1 * math.log(4) + 1) / (0.05 * math.log(4) + 1))),
}


@pytest.mark.parametrize("name", CHECKPOINTS)
def test_llama_checkpoint_with_ntk_or_yarn_matches_transformers(name, tmp_path):
    fields, expected_scaling = CHECKPOINTS[name]
    theirs = _llama(name.split("-")[0], **fields)
    theirs.save_pretrained(tmp_path)
    ours = from_pretrained(tmp_path)
    assert ours.config.rope_scaling == expected_scaling and ours.config.n_ctx == 64
    ids = torch.randint(1, 97, (2, 60), generator=torch.Generator().manual_seed(3))  # beyond the original 16
    with torch.no_grad():
        ref = theirs(ids).logits
        torch.testing.assert_close(ours(ids), ref, atol=1e-5, rtol=0)  # transformers' RoPE is float32
        plain = Llama(ours.config.__class__(**{**ours.config.__dict__, "rope_scaling": None}))
        plain.load_state_dict(ours.state_dict())
        assert (plain(ids) - ref).abs().max() > 1e-2  # plain RoPE would fail this test
        seq = ids[:, :9]
        for _ in range(12):  # crosses the original length while decoding with a KV cache
            seq = torch.cat([seq, theirs(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(greedy_generate(ours, ids[:, :9], 12), seq)
    save_pretrained(ours, tmp_path / "back")  # and back: transformers reads the same RoPE parameters
    back = tr.LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert back.config.max_position_embeddings == theirs.config.max_position_embeddings
    assert config_from_hf(back.config.to_dict()) == ours.config
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref, atol=1e-5, rtol=0)


def test_saving_what_transformers_llama_cannot_express_is_refused(tmp_path):
    from companion.models import LlamaConfig

    with pytest.raises(ValueError, match="rope_type='ntk' has no transformers equivalent"):
        save_pretrained(Llama(LlamaConfig(**{**LlamaConfig.tiny().__dict__, "rope_scaling": RopeScaling.ntk(2.0)})),
                        tmp_path)
    with pytest.raises(ValueError, match="no QK-norm or sliding window, got qk_norm=True"):
        save_pretrained(Llama(LlamaConfig(**{**LlamaConfig.tiny().__dict__, "qk_norm": True})), tmp_path)
