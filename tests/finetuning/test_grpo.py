import pytest
import torch

from companion.finetuning.grpo import GRPOConfig, group_advantages, grpo_loss, k3_kl, train_grpo
from companion.models import GPT, GPTConfig


def test_group_advantages_formula_and_equal_rewards():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.float64)
    adv = group_advantages(r, eps=1e-4)
    std = (torch.tensor([0.25, 0.25, 0.25, 0.25]).sum() * 4 / 3 / 4).sqrt()  # unbiased std of (1, 0, 0, 1)
    torch.testing.assert_close(adv[0], (r[0] - 0.5) / (std.double() + 1e-4))
    assert bool((adv[1] == 0).all())
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_k3_is_nonnegative_and_unbiased_for_the_exact_kl():
    g = torch.Generator().manual_seed(0)
    logp = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    ref = torch.log_softmax(torch.randn(6, generator=g, dtype=torch.float64), 0)
    k3 = k3_kl(logp, ref)
    assert bool((k3 >= 0).all())
    exact = (logp.exp() * (logp - ref)).sum()  # KL(pi || ref)
    torch.testing.assert_close((logp.exp() * k3).sum(), exact, atol=1e-12, rtol=1e-12)


def bandit_logps(theta, actions):
    return torch.log_softmax(theta, 0)[actions][:, None]  # (N, 1): one "token" per completion


def test_bandit_step_raises_the_rewarded_action():
    theta = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    actions = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    reward = (actions == 0).double().view(1, -1)  # (P=1, G=8): only action 0 is rewarded
    adv = group_advantages(reward).flatten()
    logp = bandit_logps(theta, actions)
    out = grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.ones_like(logp), beta=0.04)
    out.loss.backward()
    with torch.no_grad():
        new = torch.softmax(theta - 0.5 * theta.grad, 0)
    assert new[0] > 0.25 and bool((new[1:] < 0.25).all())
    assert out.kl == 0 and out.clip_fraction == 0


def test_equal_rewards_give_no_gradient_at_the_reference():
    theta = torch.randn(4, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).requires_grad_()
    actions = torch.tensor([0, 1, 1, 3])
    adv = group_advantages(torch.ones(1, 4, dtype=torch.float64)).flatten()
    logp = bandit_logps(theta, actions)
    grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.ones_like(logp)).loss.backward()
    assert theta.grad.abs().max() < 1e-12


@pytest.mark.parametrize("advantage, clipped", [(1.0, True), (-1.0, False)])
def test_clip_bounds(advantage, clipped):
    theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    actions = torch.tensor([0])
    logp = bandit_logps(theta, actions)
    old = logp.detach() - 0.5  # ratio = e^0.5 = 1.65 > 1 + 0.2
    out = grpo_loss(logp, old, logp.detach(), torch.tensor([advantage], dtype=torch.float64),
                    torch.ones_like(logp), clip_eps=0.2, beta=0.0)
    out.loss.backward()
    if clipped:  # a positive advantage beyond 1 + eps: the clipped constant wins, no gradient
        assert theta.grad.abs().max() == 0 and out.clip_fraction == 1.0
        assert out.loss.item() == pytest.approx(-1.2)
    else:  # a negative advantage: the min keeps the unclipped term, the gradient pushes the action down
        assert theta.grad[0] > 0 and out.clip_fraction == 0.0
        assert out.loss.item() == pytest.approx(float(torch.exp(torch.tensor(0.5))))


def test_grpo_loss_errors():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="clip_eps"):
        grpo_loss(x, x, x, torch.zeros(2), x + 1, clip_eps=1.5)
    with pytest.raises(ValueError, match="shapes"):
        grpo_loss(x, x, x, torch.zeros(3), x + 1)
    with pytest.raises(ValueError, match="at least one token"):
        grpo_loss(x, x, x, torch.zeros(2), x)
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)


def test_train_grpo_raises_the_reward_of_a_tiny_gpt():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=8, n_ctx=12, n_layers=1, d_model=16, n_heads=2)).eval()

    def reward(j, completion):  # share of completion tokens equal to 5 (7 is the end token)
        body = [t for t in completion if t != 7]
        return sum(t == 5 for t in body) / max(len(body), 1)

    hist = train_grpo(model, [[1, 2], [1, 3]], reward, eos_id=7, pad_id=0,
                      config=GRPOConfig(steps=12, group_size=8, lr=3e-2, max_new_tokens=6))
    assert sum(hist["reward"][-3:]) / 3 > sum(hist["reward"][:3]) / 3 + 0.2
    assert hist["kl"][0] == 0 and hist["kl"][-1] > 0
