"""companion.nn.moe against the explicit weighted sum, the dense average, transformers' Mixtral MoE block and its
load-balancing loss, and hand-computed values of the Switch Transformer auxiliary loss."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from companion.nn.moe import (MoE, MoEConfig, expert_counts, load_balancing_loss, record_router_logits, router_probs,
                              router_z_loss)

C = 16
EXACT = dict(rtol=1e-12, atol=1e-12)  # float64, same operations up to summation order


def make(config: MoEConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    moe = MoE(C, config).double()
    with torch.no_grad():
        for p in moe.parameters():
            p.normal_(0.0, 0.3)
    return moe


def swiglu(expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ expert.gate.weight.T) * (x @ expert.up.weight.T)) @ expert.down.weight.T


@pytest.mark.parametrize("config", [MoEConfig(n_experts=4, top_k=2, d_expert=8),
                                    MoEConfig(n_experts=6, top_k=1, d_expert=8),
                                    MoEConfig(n_experts=5, top_k=3, d_expert=8, normalize=False),
                                    MoEConfig(n_experts=4, top_k=2, d_expert=8, score="sigmoid", n_shared=2)])
def test_each_token_is_the_weighted_sum_of_its_top_k_experts(config):
    moe = make(config)
    x = torch.randn(2, 7, C, dtype=torch.float64)
    out = moe(x)  # (2, 7, C)
    tokens = x.reshape(-1, C)
    logits = tokens @ moe.router.weight.T  # (N, E)
    scores = logits.softmax(-1) if config.score == "softmax" else logits.sigmoid()
    for n in range(tokens.shape[0]):
        chosen = sorted(range(config.n_experts), key=lambda e: -scores[n, e].item())[: config.top_k]
        w = scores[n, chosen]
        if config.normalize:
            w = w / w.sum()
        expected = sum(wi * swiglu(moe.experts[e], tokens[n]) for wi, e in zip(w, chosen))
        expected = expected + sum((swiglu(s, tokens[n]) for s in moe.shared), torch.zeros(C, dtype=torch.float64))
        torch.testing.assert_close(out.reshape(-1, C)[n], expected, **EXACT)


def test_all_experts_with_equal_weights_is_the_dense_average():
    moe = make(MoEConfig(n_experts=4, top_k=4, d_expert=8))
    with torch.no_grad():
        moe.router.weight.zero_()  # equal logits: every weight is 1/E
    x = torch.randn(3, 5, C, dtype=torch.float64)
    dense = sum(expert(x) for expert in moe.experts) / 4
    torch.testing.assert_close(moe(x), dense, **EXACT)


def test_one_expert_is_a_swiglu_ffn():
    moe = make(MoEConfig(n_experts=1, top_k=1, d_expert=8))
    x = torch.randn(2, 3, C, dtype=torch.float64)
    torch.testing.assert_close(moe(x), moe.experts[0](x), **EXACT)


def test_gradients_reach_the_router_and_only_the_chosen_experts():
    # top-1 without renormalisation (Switch Transformer): the output is p_e * expert_e(x), so the router learns from
    # it. Renormalised top-1 (Mixtral's rule with k = 1) weighs the expert by p_e / p_e = 1: no gradient at all.
    x = torch.randn(1, 2, C, dtype=torch.float64)  # two tokens: at most 2 of the 8 experts are used
    renormalised = make(MoEConfig(n_experts=8, top_k=1, d_expert=8))
    renormalised(x).sum().backward()
    assert float(renormalised.router.weight.grad.abs().max()) < 1e-12
    moe = make(MoEConfig(n_experts=8, top_k=1, d_expert=8, normalize=False))
    moe(x).sum().backward()
    assert moe.router.weight.grad is not None and moe.router.weight.grad.abs().sum() > 0
    used = set(moe.route(x.reshape(-1, C))[1].flatten().tolist())
    for e, expert in enumerate(moe.experts):
        has_grad = expert.down.weight.grad is not None and expert.down.weight.grad.abs().sum() > 0
        assert has_grad == (e in used), (e, used)


def test_matches_transformers_mixtral_sparse_moe_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    hf_config = MixtralConfig(hidden_size=C, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                              router_jitter_noise=0.0, experts_implementation="eager")
    torch.manual_seed(0)
    ref = MixtralSparseMoeBlock(hf_config).double().eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    ours = MoE(C, MoEConfig(n_experts=4, top_k=2, d_expert=24)).double()
    with torch.no_grad():
        ours.router.weight.copy_(ref.gate.weight)
        for e, expert in enumerate(ours.experts):
            gate, up = ref.experts.gate_up_proj[e].chunk(2, dim=0)  # (F, C) each
            expert.gate.weight.copy_(gate)
            expert.up.weight.copy_(up)
            expert.down.weight.copy_(ref.experts.down_proj[e])
    x = torch.randn(3, 9, C, dtype=torch.float64)
    with torch.no_grad():
        expected = ref(x)
    # transformers computes the router softmax in float32 (router_logits.float()), so the weights carry float32
    # rounding: agreement to ~1e-7 relative, not float64's 1e-15
    torch.testing.assert_close(ours(x), expected, rtol=1e-6, atol=1e-6)
    changed = x.clone()
    changed[0, 0] += 1.0
    assert not torch.allclose(ours(changed), expected, rtol=1e-6, atol=1e-6)  # the comparison can fail


def test_balance_loss_is_one_when_balanced_and_e_when_collapsed():
    E, k = 4, 1
    balanced = torch.zeros(8, E, dtype=torch.float64)
    balanced[torch.arange(8), torch.arange(8) % E] = 1e-3  # each expert wins 2 of 8 tokens, probabilities ~1/E
    assert abs(load_balancing_loss(balanced, k).item() - 1.0) < 1e-3
    uniform_choice = torch.zeros(8, E, dtype=torch.float64)
    uniform_choice[torch.arange(8), torch.arange(8) % E] = 1.0
    torch.testing.assert_close(load_balancing_loss(uniform_choice, k), torch.tensor(1.0, dtype=torch.float64))
    collapsed = torch.zeros(8, E, dtype=torch.float64)
    collapsed[:, 0] = 100.0
    torch.testing.assert_close(load_balancing_loss(collapsed, k), torch.tensor(float(E), dtype=torch.float64))
    # top-2: each token's second expert has probability ~0, so f = (1/2, ...), P = (1, 0, ...): E / 2
    torch.testing.assert_close(load_balancing_loss(collapsed, 2), torch.tensor(E / 2, dtype=torch.float64))


def test_balance_loss_on_a_hand_example():
    # 2 experts, 2 tokens, top-1. Token 0: p = (0.8, 0.2) -> expert 0; token 1: p = (0.4, 0.6) -> expert 1.
    p = torch.tensor([[0.8, 0.2], [0.4, 0.6]], dtype=torch.float64)
    logits = p.log()
    # f = (1/2, 1/2), P = (0.6, 0.4): loss = 2 * (0.5 * 0.6 + 0.5 * 0.4) = 1.0
    torch.testing.assert_close(load_balancing_loss(logits, 1), torch.tensor(1.0, dtype=torch.float64))
    # both tokens to expert 0: p = (0.8, 0.2), (0.7, 0.3): f = (1, 0), P = (0.75, 0.25): loss = 2 * 0.75 = 1.5
    logits = torch.tensor([[0.8, 0.2], [0.7, 0.3]], dtype=torch.float64).log()
    torch.testing.assert_close(load_balancing_loss(logits, 1), torch.tensor(1.5, dtype=torch.float64))
    # top-2 of 2 experts: f = (1/2, 1/2) always, so the loss is E * mean(P) . f = 1
    torch.testing.assert_close(load_balancing_loss(logits, 2), torch.tensor(1.0, dtype=torch.float64))


def test_balance_loss_is_top_k_times_transformers():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    logits = torch.randn(40, 8)
    for k in (1, 2, 3):
        ref = load_balancing_loss_func((logits,), num_experts=8, top_k=k)
        torch.testing.assert_close(k * load_balancing_loss(logits, k), ref, rtol=1e-5, atol=1e-6)


def test_balance_loss_gradient_lowers_the_busiest_expert():
    logits = torch.tensor([[2.0, 0.0, 0.0], [1.5, 0.2, 0.0], [1.0, 0.0, 0.5]], dtype=torch.float64,
                          requires_grad=True)
    load_balancing_loss(logits, 1).backward()
    assert (logits.grad[:, 0] > 0).all()  # gradient descent pushes expert 0's logits down


def test_sigmoid_probs_and_z_loss():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]], dtype=torch.float64)
    torch.testing.assert_close(router_probs(logits, "sigmoid"),
                               torch.tensor([[0.5, 0.5], [0.75 / 1.25, 0.5 / 1.25]], dtype=torch.float64))
    # logsumexp of (0, 0) = ln 2; of (ln 3, 0) = ln 4
    expected = (math.log(2.0) ** 2 + math.log(4.0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), torch.tensor(expected, dtype=torch.float64))


def test_expert_counts():
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    assert expert_counts(logits, 1).tolist() == [1, 1, 1]
    assert expert_counts(logits, 2).tolist() == [1, 3, 2]


def test_record_router_logits_collects_every_layer_and_leaves_no_hooks():
    config = MoEConfig(n_experts=4, top_k=2, d_expert=8)
    model = nn.Sequential(MoE(C, config), MoE(C, config))
    x = torch.randn(2, 3, C)
    with record_router_logits(model) as logits:
        model(x)
    assert [tuple(l.shape) for l in logits] == [(6, 4), (6, 4)]
    assert logits[0].requires_grad
    assert all(not m.router._forward_hooks for m in model)
    with pytest.raises(ValueError, match="no MoE layer"):
        with record_router_logits(nn.Linear(2, 2)):
            pass


def test_config_errors_name_the_values():
    with pytest.raises(ValueError, match="top_k=3, n_experts=2"):
        MoEConfig(n_experts=2, top_k=3)
    with pytest.raises(ValueError, match="score must be"):
        MoEConfig(score="relu")
    with pytest.raises(ValueError, match="n_shared must be >= 0, got -1"):
        MoEConfig(n_shared=-1)


def test_parameter_count_matches_numel():
    config = MoEConfig(n_experts=6, top_k=2, d_expert=8, n_shared=1)
    moe = MoE(C, config)
    assert config.n_params(C) == sum(p.numel() for p in moe.parameters())
    assert config.n_params(C, active=True) == C * 6 + 3 * config.expert_parameters(C)
