"""Parameter groups (what is decayed), AdamW against torch.optim.AdamW, the warmup + cosine schedule against
its formula and against transformers.get_cosine_schedule_with_warmup."""

import math

import pytest
import torch
from torch import nn

from companion.nn.layers import RMSNorm
from companion.nn.positional import LearnedPositionalEmbedding
from companion.training.optim import OptimizerConfig, adamw_step, build_optimizer, lr_at, param_groups, split_decay


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(11, 6)
        self.pos = LearnedPositionalEmbedding(6, 8)
        self.fc = nn.Linear(6, 6)
        self.ln = nn.LayerNorm(6)
        self.rms = RMSNorm(6)
        self.head = nn.Linear(6, 11, bias=False)
        self.head.weight = self.tok.weight  # tied

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.rms(self.ln(self.fc(self.pos(self.tok(idx))))))  # (B, T, V)


def test_no_decay_on_norms_biases_embeddings():
    decay, no_decay = split_decay(Tied())
    assert decay == ["fc.weight"]
    assert sorted(no_decay) == ["fc.bias", "ln.bias", "ln.weight", "pos.weight", "rms.weight", "tok.weight"]
    decay, _ = split_decay(Tied(), decay_embeddings=True)
    assert sorted(decay) == ["fc.weight", "pos.weight", "tok.weight"]  # the tied head appears once, as tok.weight


def test_groups_cover_every_parameter_once():
    model = Tied()
    groups = param_groups(model, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


def test_adamw_from_the_paper_matches_torch():
    torch.manual_seed(0)
    p = torch.randn(5, 4)
    ours, theirs = p.clone(), p.clone().requires_grad_()
    opt = torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for step in range(1, 21):
        grad = torch.randn(5, 4)
        theirs.grad = grad.clone()
        opt.step()
        adamw_step(ours, grad, m, v, step, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    torch.testing.assert_close(ours, theirs.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m, opt.state[theirs]["exp_avg"], rtol=1e-6, atol=1e-8)


def test_our_optimizer_equals_per_parameter_adamw_with_the_right_decay():
    """Every parameter must move exactly as torch.optim.AdamW moves it alone, with decay 0.1 on weight
    matrices and 0 on the rest: groups, lr and betas all reach the optimizer."""
    torch.manual_seed(0)
    model, config = Tied(), OptimizerConfig(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6, decay_steps=10)
    reference = {n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()}
    decay, _ = split_decay(model)
    singles = {n: torch.optim.AdamW([q], lr=1e-2, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1 if n in decay else 0.0)
               for n, q in reference.items()}
    opt = build_optimizer(model, config)
    for _ in range(5):
        grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = grads[n].clone()
            reference[n].grad = grads[n].clone()
            singles[n].step()
        opt.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[n].detach(), rtol=0, atol=0, msg=n)


def test_schedule_values_match_the_formula():
    c = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110)
    assert lr_at(0, c) == 0.0
    assert lr_at(5, c) == pytest.approx(5e-4)
    assert lr_at(10, c) == pytest.approx(1e-3)  # the peak, at the end of warm-up
    assert lr_at(60, c) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half-way through the cosine: cos(pi/2) = 0
    assert lr_at(35, c) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_at(110, c) == lr_at(500, c) == 1e-4
    values = [lr_at(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_schedule_matches_transformers_cosine_with_warmup():
    from transformers import get_cosine_schedule_with_warmup

    c = OptimizerConfig(lr=2e-3, warmup_steps=7, decay_steps=50)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=50)
    for step in range(51):  # past the end transformers' cosine rises again; ours stays at min_lr
        assert lr_at(step, c) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()


def test_config_errors():
    with pytest.raises(ValueError, match="got lr=0.001, min_lr=0.01"):
        OptimizerConfig(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="warmup_steps=20, decay_steps=10"):
        OptimizerConfig(warmup_steps=20, decay_steps=10)
    with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\), got \(0.9, 1.0\)"):
        OptimizerConfig(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="step must be >= 0, got -1"):
        lr_at(-1, OptimizerConfig())
    with pytest.raises(ValueError, match="weight_decay must be >= 0, got -0.1"):
        param_groups(Tied(), -0.1)


def test_wsd_values_match_the_formula():
    # W = 10, S = 110, D = round(0.25 * 110) = 28: stable on [10, 82), linear decay on [82, 110]
    c = OptimizerConfig(lr=1e-3, min_lr=1e-4, warmup_steps=10, decay_steps=110, schedule="wsd", decay_fraction=0.25)
    assert (c.decay_length(), c.decay_start()) == (28, 82)
    assert lr_at(0, c) == 0.0
    assert lr_at(5, c) == pytest.approx(5e-4)  # the same warm-up as the cosine
    assert lr_at(10, c) == lr_at(50, c) == lr_at(81, c) == 1e-3  # stable: exactly the peak
    assert lr_at(82, c) == pytest.approx(1e-3)  # the decay starts from the peak ...
    assert lr_at(96, c) == pytest.approx(1e-4 + 0.9e-3 * 14 / 28)  # ... half-way: (S - step) / D = 1/2
    assert lr_at(109, c) == pytest.approx(1e-4 + 0.9e-3 / 28)
    assert lr_at(110, c) == lr_at(500, c) == 1e-4
    values = [lr_at(s, c) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_wsd_matches_transformers_wsd_with_linear_decay():
    from transformers import get_wsd_schedule

    c = OptimizerConfig(lr=2e-3, warmup_steps=7, decay_steps=50, schedule="wsd", decay_fraction=0.3)
    D = c.decay_length()  # 15
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched = get_wsd_schedule(opt, num_warmup_steps=7, num_decay_steps=D, num_stable_steps=50 - 7 - D,
                             decay_type="linear")
    for step in range(60):
        assert lr_at(step, c) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12), step
        opt.step()
        sched.step()


def test_default_schedule_is_still_the_cosine():
    assert OptimizerConfig().schedule == "cosine"
    c, w = OptimizerConfig(lr=1.0, warmup_steps=3, decay_steps=20), OptimizerConfig(lr=1.0, warmup_steps=3,
                                                                                     decay_steps=20, schedule="wsd")
    assert lr_at(10, c) < 1.0 == lr_at(10, w)  # the two really differ in the middle


def test_wsd_config_errors():
    with pytest.raises(ValueError, match="schedule must be one of .*got 'linear'"):
        OptimizerConfig(schedule="linear")
    with pytest.raises(ValueError, match="decay_fraction must be in \\(0, 1\\], got 0"):
        OptimizerConfig(schedule="wsd", decay_fraction=0)
    with pytest.raises(ValueError, match="would begin before the warm-up ends"):
        OptimizerConfig(warmup_steps=50, decay_steps=100, schedule="wsd", decay_fraction=0.6)
