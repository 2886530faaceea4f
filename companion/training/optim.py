"""AdamW (Loshchilov & Hutter, 2019) with parameter groups, and two learning-rate schedules: warmup + cosine
(Loshchilov & Hutter, 2017; as used by GPT-3 and LLaMA) and warmup-stable-decay, "WSD" (MiniCPM, Hu et al., 2024;
Hägele et al., 2024): a constant rate after the warm-up and a short linear decay at the end, so a run can be
continued from any checkpoint of the stable phase and "cooled down" whenever a model is wanted.

Weight decay pulls weights towards zero; it is applied to matrices of linear layers only. Biases and norm
gains are not decayed (shrinking a LayerNorm gain to zero is not regularisation), nor, by default, embeddings
(a rare token's row would decay while its gradient is zero) — the choice of minGPT and of Hugging Face's
``Trainer``. The schedule is a pure function of the step, so a resumed run needs to store only the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from companion.nn.layers import LayerNorm, RMSNorm
from companion.nn.positional import LearnedPositionalEmbedding

NORM_TYPES: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.RMSNorm, LayerNorm, RMSNorm, nn.GroupNorm,
                                           nn.BatchNorm1d)
EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, LearnedPositionalEmbedding)


def split_decay(model: nn.Module, decay_embeddings: bool = False) -> tuple[list[str], list[str]]:
    """Names of the parameters to decay and not to decay: ``(decay, no_decay)``.

    No decay: every 1-D parameter (biases, gains), every parameter of a norm layer, and embedding tables unless
    ``decay_embeddings``. A parameter shared by several modules (tied input/output embeddings) is listed once,
    under its first name, and is not decayed if any of its owners says so.
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if (p.ndim < 2 or isinstance(module, NORM_TYPES)
                    or (isinstance(module, EMBEDDING_TYPES) and not decay_embeddings)):
                no_decay_ids.add(id(p))
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # shared parameters appear once
        if p.requires_grad:
            (no_decay if id(p) in no_decay_ids else decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float, decay_embeddings: bool = False) -> list[dict]:
    """Two optimizer parameter groups: ``weight_decay`` on weight matrices, 0 on the rest (see :func:`split_decay`)."""
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    params = dict(model.named_parameters())
    decay, no_decay = split_decay(model, decay_embeddings)
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay, "names": decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0, "names": no_decay}]


SCHEDULES = ("cosine", "wsd")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW hyper-parameters and the learning-rate schedule."""

    lr: float = 3e-4  # peak learning rate, reached at the end of warm-up
    min_lr: float = 0.0  # floor of the cosine decay (LLaMA: lr / 10)
    warmup_steps: int = 0  # linear warm-up from 0 over this many optimizer steps
    decay_steps: int = 1000  # step at which the cosine reaches min_lr (usually = total optimizer steps)
    weight_decay: float = 0.1  # decoupled weight decay on weight matrices
    betas: tuple[float, float] = (0.9, 0.95)  # Adam's moment decay rates (GPT-3, LLaMA)
    eps: float = 1e-8  # Adam's denominator guard
    decay_embeddings: bool = False  # also decay embedding tables
    schedule: str = "cosine"  # "cosine" (warm-up + cosine) or "wsd" (warm-up, stable, linear decay)
    decay_fraction: float = 0.2  # WSD only: the last round(decay_fraction * decay_steps) steps decay to min_lr

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {self.decay_fraction!r}")
        if self.lr <= 0 or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr!r}, min_lr={self.min_lr!r}")
        if self.warmup_steps < 0 or self.decay_steps < 1 or self.warmup_steps > self.decay_steps:
            raise ValueError(f"need 0 <= warmup_steps <= decay_steps and decay_steps >= 1, got "
                             f"warmup_steps={self.warmup_steps!r}, decay_steps={self.decay_steps!r}")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        if self.schedule == "wsd" and self.decay_start() < self.warmup_steps:
            raise ValueError(f"WSD: the decay (last {self.decay_length()} of {self.decay_steps} steps) would begin "
                             f"before the warm-up ends (warmup_steps={self.warmup_steps!r}); lower decay_fraction "
                             "or warmup_steps")

    def decay_length(self) -> int:
        """WSD: number of decay steps D = max(1, round(decay_fraction * decay_steps))."""
        return max(1, round(self.decay_fraction * self.decay_steps))

    def decay_start(self) -> int:
        """WSD: first step of the decay, S - D."""
        return self.decay_steps - self.decay_length()


def lr_at(step: int, config: OptimizerConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up, then the decay of ``config.schedule``.

    warm-up (step < W):  lr * step / W
    cosine (W <= step <= S):  min_lr + (lr - min_lr) * (1 + cos(pi * (step - W) / (S - W))) / 2
    wsd: stable (W <= step < S - D):  lr;  decay (S - D <= step <= S):  min_lr + (lr - min_lr) * (S - step) / D
    after S:  min_lr
    With ``min_lr = 0`` the cosine is ``transformers.get_cosine_schedule_with_warmup`` and the WSD decay is
    ``transformers.get_wsd_schedule`` with a linear decay.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    W, S = config.warmup_steps, config.decay_steps
    if step < W:
        return config.lr * step / W
    if step >= S:
        return config.min_lr
    if config.schedule == "wsd":
        D = config.decay_length()
        if step < S - D:
            return config.lr
        return config.min_lr + (config.lr - config.min_lr) * (S - step) / D
    progress = (step - W) / (S - W)
    return config.min_lr + (config.lr - config.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over :func:`param_groups`; set each step's rate with :func:`set_lr`."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(
        model, config.weight_decay, config.decay_embeddings)]
    return torch.optim.AdamW(groups, lr=lr_at(0, config), betas=config.betas, eps=config.eps,
                             foreach=False)  # one fixed kernel path: identical numbers on every run


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def adamw_step(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float,
               betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0) -> None:
    """One AdamW update of ``param`` in place, written out (the algorithm box of Loshchilov & Hutter, 2019).

    ``m`` and ``v`` are the first and second moment estimates (updated in place); ``step`` counts from 1.
    """
    b1, b2 = betas
    param.mul_(1 - lr * weight_decay)  # decoupled decay: not part of the gradient
    m.mul_(b1).add_(grad, alpha=1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    m_hat = m / (1 - b1**step)  # bias corrections
    v_hat = v / (1 - b2**step)
    param.addcdiv_(m_hat, v_hat.sqrt().add_(eps), value=-lr)
