"""GPT with a mixture-of-experts MLP (``GPTConfig.moe``): the blocks hold `MoE` layers, the dense default is
untouched, routers are trained through the recorded logits, and KV-cached decoding equals uncached decoding."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from companion.models import GPT, GPTConfig, greedy_generate
from companion.nn.layers import FeedForward
from companion.nn.moe import MoE, MoEConfig, load_balancing_loss, record_router_logits

CONFIG = replace(GPTConfig.tiny(), moe=MoEConfig(n_experts=4, top_k=2, d_expert=48))


def test_every_block_has_an_moe_mlp_and_the_default_stays_dense():
    assert all(isinstance(b.ffn, MoE) for b in GPT(CONFIG).blocks)
    assert all(type(b.ffn) is FeedForward for b in GPT(GPTConfig.tiny()).blocks)


def test_dense_default_weights_do_not_depend_on_the_option():
    # the same seed gives the same dense model whether or not an MoE model was built in between: no shared state
    torch.manual_seed(0)
    a = GPT(GPTConfig.tiny()).state_dict()
    GPT(CONFIG)
    torch.manual_seed(0)
    b = GPT(replace(GPTConfig.tiny(), moe=None)).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_expert_down_projections_get_the_scaled_init():
    torch.manual_seed(0)
    model = GPT(replace(CONFIG, n_layers=8, moe=replace(CONFIG.moe, d_expert=512, n_experts=2)))
    down = model.blocks[0].ffn.experts[0].down.weight
    up = model.blocks[0].ffn.experts[0].up.weight
    assert abs(down.std().item() - 0.02 / 4) < 0.0005 and abs(up.std().item() - 0.02) < 0.002


def test_balance_loss_trains_the_routers():
    model = GPT(CONFIG)
    idx = torch.randint(0, 256, (2, 16))
    with record_router_logits(model) as logits:
        out = model(idx)
    assert out.shape == (2, 16, 256) and len(logits) == CONFIG.n_layers
    assert all(l.shape == (32, 4) for l in logits)
    aux = sum(load_balancing_loss(l, CONFIG.moe.top_k) for l in logits)
    aux.backward()
    assert all(b.ffn.router.weight.grad.abs().sum() > 0 for b in model.blocks)
    assert model.tok_emb.weight.grad.abs().sum() > 0  # the aux loss also reaches the layers below the routers


def test_kv_cache_decoding_equals_uncached():
    torch.manual_seed(0)
    model = GPT(CONFIG).eval()
    prompt = torch.randint(0, 256, (2, 5))
    torch.testing.assert_close(greedy_generate(model, prompt, 8, use_cache=True),
                               greedy_generate(model, prompt, 8, use_cache=False), rtol=0, atol=0)


def test_moe_gpt_is_refused_by_the_hf_writer_and_counted_by_active_flops(tmp_path):
    from companion.models import GPT, GPTConfig, count_parameters, save_pretrained, to_hf_state_dict
    from companion.nn.moe import MoEConfig
    from companion.scaling import flops_per_token

    cfg = GPTConfig(vocab_size=64, n_ctx=16, n_layers=2, d_model=32, n_heads=4, d_ff=64,
                    moe=MoEConfig(n_experts=4, top_k=2, d_expert=32))
    model = GPT(cfg)
    for write in (lambda: save_pretrained(model, tmp_path / "out"), lambda: to_hf_state_dict(model)):
        with pytest.raises(TypeError, match="mixture-of-experts"):
            write()
    active = count_parameters(cfg, embeddings=False, active=True)
    assert active < count_parameters(cfg, embeddings=False)
    assert flops_per_token(cfg, training=False) == 2.0 * active + 2.0 * cfg.n_layers * cfg.n_ctx * cfg.d_model
