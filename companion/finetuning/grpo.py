"""Group Relative Policy Optimization (GRPO): reinforcement learning with a reward that code checks.

Shao et al. (2024), "DeepSeekMath" (GRPO), used at scale in DeepSeek-AI (2025), "DeepSeek-R1". For every prompt,
G completions are sampled from the current policy and scored by a reward function; the advantage of completion i
is its reward relative to its group, (r_i - mean(r)) / (std(r) + eps) (no value network). The objective is PPO's
clipped ratio (Schulman et al., 2017) per token, minus beta times the k3 estimate of KL(pi || ref),
exp(ref - logp) - (ref - logp) - 1 (Schulman, 2020, "Approximating KL divergence"), averaged over each
completion's tokens and then over completions (the paper's 1/|o_i| sum). The group std is the unbiased one, as in
trl's ``GRPOTrainer``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - group mean) / (group std + eps) along the last dimension. rewards: (P, G) -> (P, G). A group whose
    rewards are all equal gets advantage 0 (it carries no signal)."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (P, G) with G >= 2 completions per prompt, got {tuple(rewards.shape)}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    mean = rewards.mean(-1, keepdim=True)  # (P, 1)
    std = rewards.std(-1, keepdim=True)  # (P, 1), unbiased
    return (rewards - mean) / (std + eps)  # (P, G)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref) from samples of pi: exp(d) - d - 1 with d = ref_logp - logp.
    Non-negative; its expectation under pi is the exact KL."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass(frozen=True)
class GRPOOutput:
    """The loss and what is logged beside it (detached)."""

    loss: torch.Tensor  # scalar to minimise: -(clipped surrogate - beta * KL)
    kl: float  # mean k3 KL over the completion tokens
    clip_fraction: float  # share of completion tokens whose ratio was clipped in the direction of its advantage


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, beta: float = 0.04) -> GRPOOutput:
    """GRPO loss. logp (policy, with grad), old_logp (the sampling policy), ref_logp (the reference): (N, T) per-token
    log-probabilities of the sampled tokens; advantages: (N,); mask: (N, T), 1 on completion tokens."""
    if not 0 < clip_eps < 1 or beta < 0:
        raise ValueError(f"clip_eps must be in (0, 1) and beta >= 0, got clip_eps={clip_eps!r}, beta={beta!r}")
    if not (logp.shape == old_logp.shape == ref_logp.shape == mask.shape) or advantages.shape != logp.shape[:1]:
        raise ValueError(f"shapes must be logp/old/ref/mask (N, T) and advantages (N,), got {tuple(logp.shape)}, "
                         f"{tuple(old_logp.shape)}, {tuple(ref_logp.shape)}, {tuple(mask.shape)}, "
                         f"{tuple(advantages.shape)}")
    mask = mask.to(logp.dtype)
    lengths = mask.sum(-1)  # (N,)
    if bool((lengths == 0).any()):
        raise ValueError("every completion needs at least one token (a row of mask is all zero)")
    ratio = torch.exp(logp - old_logp)  # (N, T)
    A = advantages[:, None]  # (N, 1)
    unclipped = ratio * A  # (N, T)
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * A  # (N, T)
    kl = k3_kl(logp, ref_logp)  # (N, T)
    per_token = torch.minimum(unclipped, clipped) - beta * kl  # (N, T)
    loss = -((per_token * mask).sum(-1) / lengths).mean()
    is_clipped = (clipped < unclipped).to(logp.dtype)  # the min took the clipped term
    n_tok = mask.sum()
    return GRPOOutput(loss, float((kl.detach() * mask).sum() / n_tok), float((is_clipped * mask).sum() / n_tok))


def token_logprobs(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token t+1 | tokens <= t) for every position: input_ids (N, T) -> (N, T-1), in at least float32."""
    logits = model(input_ids)[:, :-1]  # (N, T-1, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.log_softmax(logits, -1).gather(-1, input_ids[:, 1:, None])[..., 0]  # (N, T-1)


@dataclass(frozen=True)
class GRPOConfig:
    """A short GRPO run on a few prompts: every step samples ``group_size`` completions of every prompt."""

    steps: int = 30  # sampling rounds
    group_size: int = 16  # G: completions per prompt
    updates_per_batch: int = 1  # mu: gradient steps on each sampled batch (1: ratio = 1, no clipping at the first)
    lr: float = 1e-4  # AdamW learning rate
    beta: float = 0.04  # weight of the KL penalty (DeepSeekMath's value)
    clip_eps: float = 0.2  # PPO clip range
    max_new_tokens: int = 40  # completion length limit
    temperature: float = 1.0  # sampling temperature
    seed: int = 0  # seeds the sampling

    def __post_init__(self) -> None:
        for name in ("steps", "group_size", "updates_per_batch", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        if not self.lr > 0 or not self.temperature > 0 or self.beta < 0 or not 0 < self.clip_eps < 1:
            raise ValueError(f"need lr > 0, temperature > 0, beta >= 0, 0 < clip_eps < 1; got lr={self.lr!r}, "
                             f"temperature={self.temperature!r}, beta={self.beta!r}, clip_eps={self.clip_eps!r}")


def train_grpo(policy: nn.Module, prompts: Sequence[Sequence[int]], reward_fn: Callable[[int, list[int]], float],
               eos_id: int, pad_id: int, config: GRPOConfig, reference: nn.Module | None = None
               ) -> dict[str, list[float]]:
    """GRPO on ``prompts`` (token ids, each a group every step). ``reward_fn(prompt_index, completion_ids)`` scores
    one completion (its ids end with ``eos_id`` when it stopped). ``reference`` defaults to a frozen copy of the
    policy as it is now. Returns per-step ``reward`` (mean), ``kl``, ``clip_fraction`` and ``loss``."""
    from companion.finetuning.sft import sample_completions

    if not prompts:
        raise ValueError("train_grpo needs at least one prompt")
    reference = reference if reference is not None else copy.deepcopy(policy)
    reference.eval().requires_grad_(False)
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    history: dict[str, list[float]] = {"reward": [], "kl": [], "clip_fraction": [], "loss": []}
    for step in range(config.steps):
        rows, rewards = [], []
        for j, prompt in enumerate(prompts):
            completions = sample_completions(policy, prompt, config.group_size, config.max_new_tokens, eos_id,
                                             seed=config.seed * 1_000_003 + step * len(prompts) + j,
                                             temperature=config.temperature)
            rewards.append([float(reward_fn(j, c)) for c in completions])
            rows.extend((list(prompt), c) for c in completions)
        reward = torch.tensor(rewards, dtype=torch.float64)  # (P, G)
        adv = group_advantages(reward).flatten().float()  # (N,)
        T = max(len(p) + len(c) for p, c in rows)
        ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (N, T)
        mask = torch.zeros(len(rows), T - 1)  # (N, T-1): 1 where the target token is a completion token
        for i, (p, c) in enumerate(rows):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, len(p) - 1:len(p) + len(c) - 1] = 1
        with torch.no_grad():
            policy.eval()
            old = token_logprobs(policy, ids)  # (N, T-1)
            ref = token_logprobs(reference, ids)  # (N, T-1)
        policy.train()
        for _ in range(config.updates_per_batch):
            out = grpo_loss(token_logprobs(policy, ids), old, ref, adv, mask, config.clip_eps, config.beta)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
        policy.eval()
        history["reward"].append(float(reward.mean()))
        history["kl"].append(out.kl)
        history["clip_fraction"].append(out.clip_fraction)
        history["loss"].append(out.loss.item())
    return history
