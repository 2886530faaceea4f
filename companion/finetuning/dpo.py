"""Direct Preference Optimization (DPO) from scratch, with a frozen reference model.

Rafailov et al. (2023), "Direct Preference Optimization: Your Language Model is Secretly a Reward Model":
loss = -log sigmoid(beta * [(log pi(y_c|x) - log ref(y_c|x)) - (log pi(y_r|x) - log ref(y_r|x))]), where the log
probabilities are sums over the *response* tokens only. beta * (log pi - log ref) is the implicit reward; the
share of pairs whose chosen reward exceeds the rejected one is the preference accuracy. The sign conventions and
the logged metrics follow trl's ``DPOTrainer`` (``rewards/chosen``, ``rewards/margins``, ...);
:func:`trl_dpo_loss` runs trl's own code on the same numbers as a reference.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from companion.objectives import IGNORE_INDEX


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over each row of log p(token t | tokens < t) at the positions whose label is not ``IGNORE_INDEX``
    (labels unshifted, as for :func:`companion.causal_lm_loss`). input_ids, labels: (B, T) -> (B,), in at least
    float32."""
    logits = model(input_ids)[:, :-1]  # (B, T-1, V): position t predicts token t+1
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    target = labels[:, 1:]  # (B, T-1)
    counted = target != IGNORE_INDEX  # (B, T-1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0)[..., None])[..., 0]  # (B, T-1)
    return (logp * counted).sum(-1)  # (B,)


@dataclass(frozen=True)
class DPOOutput:
    """The loss and what trl logs beside it (rewards are detached)."""

    loss: torch.Tensor  # scalar: mean DPO loss over the pairs
    chosen_rewards: torch.Tensor  # (B,): beta * (log pi - log ref) of the chosen responses
    rejected_rewards: torch.Tensor  # (B,): the same for the rejected responses

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards  # (B,)

    @property
    def accuracy(self) -> float:
        """Share of pairs whose chosen reward exceeds the rejected one."""
        return float((self.chosen_rewards > self.rejected_rewards).double().mean())


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> DPOOutput:
    """DPO loss from sequence log-probabilities, each (B,). Returns the mean loss and the implicit rewards."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        raise ValueError(f"the four log-probabilities must be 1-D of the same length, got shapes {sorted(shapes)}")
    chosen_logratio = policy_chosen - ref_chosen  # (B,)
    rejected_logratio = policy_rejected - ref_rejected  # (B,)
    loss = -F.logsigmoid(beta * (chosen_logratio - rejected_logratio)).mean()
    return DPOOutput(loss, beta * chosen_logratio.detach(), beta * rejected_logratio.detach())


def trl_dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
                 ref_rejected: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """trl's DPO loss (``loss_type="sigmoid"``) on the same sequence log-probabilities, as a reference.

    trl 1.x computes the loss inside ``DPOTrainer._compute_loss(model, inputs)``, from a model output with
    per-token ``log_probs``. We call that method on a minimal stand-in for the trainer (beta, the sigmoid loss, the
    reference log-probs "precomputed") and a stand-in model whose per-token log-probs sum to the given sequence
    log-probs (one completion token per row), so that trl's own arithmetic produces the number."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl import DPOTrainer

    if not hasattr(DPOTrainer, "_compute_loss"):
        raise RuntimeError("this trl has no DPOTrainer._compute_loss (trl >= 1.0 is needed for this reference)")
    B = policy_chosen.shape[0]
    logps = torch.cat([policy_chosen, policy_rejected])[:, None]  # (2B, 1): the one completion token
    outputs = SimpleNamespace(log_probs=logps, entropy=torch.zeros_like(logps), mean_logits=torch.zeros_like(logps),
                              is_top1=torch.zeros_like(logps, dtype=torch.bool))
    model = SimpleNamespace(training=True)

    def forward(**kwargs):
        return outputs

    identity = lambda t: t  # noqa: E731  (one process: gathering is the identity)
    trainer = SimpleNamespace(
        model=model, accelerator=SimpleNamespace(device=logps.device, gather_for_metrics=identity, gather=identity),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=["sigmoid"], loss_weights=[1.0], beta=beta, use_weighting=False,
        _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(2 * B, 2, dtype=torch.long), "attention_mask": torch.ones(2 * B, 2),
              "completion_mask": torch.tensor([[0, 1]] * (2 * B)), "ref_chosen_logps": ref_chosen,
              "ref_rejected_logps": ref_rejected}
    return DPOTrainer._compute_loss(trainer, forward, inputs, return_outputs=False)


# ----------------------------------------------------------------------------------------- data and training
def collate_pairs(chosen: Sequence[dict[str, list[int]]], rejected: Sequence[dict[str, list[int]]], pad_id: int
                  ) -> dict[str, torch.Tensor]:
    """One batch of ``2B`` rows, the chosen ones first (trl's layout), from :func:`companion.finetuning.sft_example`
    rows whose labels mark the response tokens."""
    from companion.finetuning.sft import collate_sft

    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"need as many chosen as rejected rows (> 0), got {len(chosen)} and {len(rejected)}")
    return collate_sft([*chosen, *rejected], pad_id)


def pair_logprobs(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) sequence log-probabilities, each (B,), of a :func:`collate_pairs` batch."""
    logps = sequence_logprobs(model, batch["input_ids"], batch["labels"])  # (2B,)
    return logps.chunk(2)


@dataclass(frozen=True)
class DPOConfig:
    """A short DPO run: AdamW, constant learning rate, the reference = a frozen copy of the starting policy."""

    beta: float = 0.1  # strength of the implicit KL constraint to the reference
    steps: int = 60  # optimizer steps
    batch_size: int = 16  # preference pairs per step
    lr: float = 1e-4  # learning rate
    sft_weight: float = 0.0  # alpha: + alpha * per-token NLL of the chosen answers (RPO, Pang et al., 2024)
    seed: int = 0  # order of the pairs

    def __post_init__(self) -> None:
        if not self.beta > 0 or not self.lr > 0:
            raise ValueError(f"beta and lr must be > 0, got beta={self.beta!r}, lr={self.lr!r}")
        if self.sft_weight < 0:
            raise ValueError(f"sft_weight must be >= 0, got {self.sft_weight!r}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps!r}, {self.batch_size!r}")


METRICS = ("loss", "accuracy", "margin", "chosen_reward", "rejected_reward", "chosen_logp", "rejected_logp")


def train_dpo(policy: nn.Module, chosen: Sequence[dict[str, list[int]]], rejected: Sequence[dict[str, list[int]]],
              pad_id: int, config: DPOConfig, reference: nn.Module | None = None) -> dict[str, list[float]]:
    """Train ``policy`` with DPO on the pairs ``(chosen[i], rejected[i])``; ``reference`` defaults to a frozen
    copy of ``policy`` as it is now. With ``config.sft_weight`` > 0 the loss adds that multiple of the chosen
    responses' per-token NLL (RPO). Returns every step's metrics (:data:`METRICS`, means over the batch; ``loss`` is
    the DPO term alone; log-probabilities are the policy's, summed over the response)."""
    if len(chosen) != len(rejected) or not chosen:
        raise ValueError(f"need as many chosen as rejected rows (> 0), got {len(chosen)} and {len(rejected)}")
    reference = reference if reference is not None else copy.deepcopy(policy)
    reference.eval().requires_grad_(False)
    g = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(chosen), generator=g).tolist()
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    history: dict[str, list[float]] = {k: [] for k in METRICS}
    policy.train()
    pos = 0
    for _ in range(config.steps):
        idx = [order[(pos + i) % len(order)] for i in range(config.batch_size)]
        pos += config.batch_size
        batch = collate_pairs([chosen[i] for i in idx], [rejected[i] for i in idx], pad_id)
        with torch.no_grad():
            ref_c, ref_r = pair_logprobs(reference, batch)
        pol_c, pol_r = pair_logprobs(policy, batch)
        out = dpo_loss(pol_c, pol_r, ref_c, ref_r, config.beta)
        loss = out.loss
        if config.sft_weight:  # the chosen responses' negative log-likelihood per token keeps them likely
            n_chosen = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(-1).chunk(2)[0]  # (B,)
            loss = loss + config.sft_weight * (-pol_c / n_chosen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for key, value in (("loss", out.loss.item()), ("accuracy", out.accuracy),
                           ("margin", out.margins.mean().item()), ("chosen_reward", out.chosen_rewards.mean().item()),
                           ("rejected_reward", out.rejected_rewards.mean().item()),
                           ("chosen_logp", pol_c.mean().item()), ("rejected_logp", pol_r.mean().item())):
            history[key].append(value)
    policy.eval()
    return history


@torch.no_grad()
def evaluate_pairs(policy: nn.Module, reference: nn.Module, chosen: Sequence[dict[str, list[int]]],
                   rejected: Sequence[dict[str, list[int]]], pad_id: int, beta: float = 0.1,
                   batch_size: int = 64) -> dict[str, float]:
    """DPO metrics of ``policy`` against ``reference`` on held-out pairs: loss, preference accuracy, mean margin
    and rewards, and the mean chosen / rejected log-probabilities under the policy."""
    policy.eval()
    sums = dict.fromkeys(METRICS, 0.0)
    n = len(chosen)
    for s in range(0, n, batch_size):
        batch = collate_pairs(chosen[s:s + batch_size], rejected[s:s + batch_size], pad_id)
        pol_c, pol_r = pair_logprobs(policy, batch)
        ref_c, ref_r = pair_logprobs(reference, batch)
        out = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta)
        k = pol_c.shape[0]
        for key, value in (("loss", out.loss.item()), ("accuracy", out.accuracy),
                           ("margin", out.margins.mean().item()), ("chosen_reward", out.chosen_rewards.mean().item()),
                           ("rejected_reward", out.rejected_rewards.mean().item()),
                           ("chosen_logp", pol_c.mean().item()), ("rejected_logp", pol_r.mean().item())):
            sums[key] += value * k
    return {k: v / n for k, v in sums.items()}
