"""Mixture-of-experts feed-forward layer: a router sends each token to k of E SwiGLU experts.

Sparsely-gated MoE (Shazeer et al., 2017) as used in Switch Transformer (Fedus et al., 2022), Mixtral (Jiang et al.,
2024) and DeepSeekMoE (Dai et al., 2024): a linear router scores the experts (softmax, or DeepSeek-V3's sigmoid),
each token keeps its top-k, the k weights are renormalised to sum to 1 (Mixtral), and the output is the weighted sum
of those experts' outputs, plus always-on shared experts (DeepSeekMoE). Capacity-free: no token is dropped. The
dispatch sorts the token-expert assignments by expert, runs each expert on its contiguous group (the layout grouped-GEMM
kernels use), gathers the outputs back with ``index_select`` and sums each token's k slots, so it is exact.
Balancing: Switch Transformer's auxiliary loss N * sum_i f_i * P_i and ST-MoE's router z-loss (Zoph et al., 2022).
The router logits are returned by :meth:`MoE.route` and collected from a whole model by :func:`record_router_logits`
(a forward hook on each router; the layer itself keeps no state).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from companion.nn.layers import FeedForward

ScoreKind = Literal["softmax", "sigmoid"]


@dataclass(frozen=True)
class MoEConfig:
    """Shape and routing of a mixture-of-experts FFN (the model width C comes from the block)."""

    n_experts: int = 8  # E, routed experts
    top_k: int = 2  # k, experts each token is sent to
    d_expert: int = 256  # hidden width of each SwiGLU expert
    n_shared: int = 0  # always-on shared experts of width d_expert (DeepSeekMoE); 0: none
    score: ScoreKind = "softmax"  # router scores: "softmax" (Mixtral, Qwen, OLMoE) or "sigmoid" (DeepSeek-V3)
    normalize: bool = True  # renormalise the k selected weights to sum to 1 (Mixtral; OLMoE does not)

    def __post_init__(self) -> None:
        for name in ("n_experts", "top_k", "d_expert"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k must be <= n_experts (got top_k={self.top_k}, n_experts={self.n_experts})")
        if self.n_shared < 0:
            raise ValueError(f"n_shared must be >= 0, got {self.n_shared!r}")
        if self.score not in ("softmax", "sigmoid"):
            raise ValueError(f"score must be 'softmax' or 'sigmoid', got {self.score!r}")

    def expert_parameters(self, d_model: int) -> int:
        """Weights of one SwiGLU expert: gate, up (C x d_expert each) and down (d_expert x C)."""
        return 3 * d_model * self.d_expert

    def n_params(self, d_model: int, *, active: bool = False) -> int:
        """Parameters of the layer (router + experts); with ``active``, those one token uses: the router, its top_k
        routed experts and the shared experts."""
        routed = self.top_k if active else self.n_experts
        return d_model * self.n_experts + (routed + self.n_shared) * self.expert_parameters(d_model)


def router_probs(logits: torch.Tensor, score: ScoreKind = "softmax") -> torch.Tensor:
    """Router scores (N, E) -> probabilities over experts (N, E): softmax, or sigmoid scores divided by their sum."""
    if score == "softmax":
        return logits.softmax(dim=-1)
    if score == "sigmoid":
        s = logits.sigmoid()
        return s / s.sum(dim=-1, keepdim=True)
    raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")


class MoE(nn.Module):
    """forward(x (..., C)) -> (..., C): sum over the token's top-k experts of weight * expert(x), plus shared experts."""

    def __init__(self, d_model: int, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.router = nn.Linear(d_model, config.n_experts, bias=False)  # W_r: (E, C)
        self.experts = nn.ModuleList(FeedForward(d_model, config.d_expert, kind="swiglu", bias=False)
                                     for _ in range(config.n_experts))
        self.shared = nn.ModuleList(FeedForward(d_model, config.d_expert, kind="swiglu", bias=False)
                                    for _ in range(config.n_shared))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tokens x (N, C) -> (weights (N, k), expert indices (N, k), router logits (N, E))."""
        logits = self.router(x)  # (N, E)
        scores = logits.softmax(dim=-1) if self.config.score == "softmax" else logits.sigmoid()  # (N, E)
        weights, indices = scores.topk(self.config.top_k, dim=-1)  # (N, k), (N, k)
        if self.config.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)  # the k weights sum to 1
        return weights, indices, logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, C), N = B * T
        weights, indices, _ = self.route(tokens)  # (N, k), (N, k)
        n, k = indices.shape
        flat = indices.reshape(-1)  # (N * k,) expert of each (token, slot) assignment
        order = flat.argsort(stable=True)  # assignments grouped by expert, expert 0 first
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()  # assignments per expert
        grouped = tokens.index_select(0, order // k)  # (N * k, C): the tokens, expert by expert
        outputs = torch.cat([expert(chunk) for expert, chunk in zip(self.experts, grouped.split(counts))])  # (N * k, C)
        outputs = outputs.index_select(0, order.argsort())  # (N * k, C) back in (token, slot) order
        out = (outputs.view(n, k, -1) * weights.unsqueeze(-1)).sum(dim=1)  # (N, C): weighted sum over the k slots
        for expert in self.shared:
            out = out + expert(tokens)  # (N, C)
        return out.reshape(shape)


def expert_counts(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Router logits (N, E) -> how many of the N * top_k assignments each expert received, (E,) int64."""
    indices = logits.topk(top_k, dim=-1).indices  # (N, k); top-k of logits = top-k of softmax/sigmoid scores
    return torch.bincount(indices.reshape(-1), minlength=logits.shape[-1])


def load_balancing_loss(logits: torch.Tensor, top_k: int, score: ScoreKind = "softmax") -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al., 2022, eq. 4): E * sum_i f_i * P_i.

    f_i: the fraction of the N * top_k token-to-expert assignments that went to expert i (not differentiable);
    P_i: the mean router probability of expert i (carries the gradient). Both sum to 1 over the experts, so the loss
    is 1 when both are uniform, and grows to E / top_k when every token goes to the same experts with probability 1
    (E for top-1). transformers' ``load_balancing_loss_func`` normalises f by N instead of N * top_k: its value is
    top_k times this one.
    """
    n_experts = logits.shape[-1]
    f = expert_counts(logits, top_k).to(logits.dtype) / (logits.shape[0] * top_k)  # (E,)
    p = router_probs(logits, score).mean(dim=0)  # (E,)
    return n_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss (Zoph et al., 2022, eq. 5): mean over tokens of logsumexp(logits)^2; keeps the router
    logits small, which makes the softmax less sensitive to rounding."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


@contextmanager
def record_router_logits(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """``with record_router_logits(model) as logits: model(x)`` -> ``logits``: the router logits (N, E) of every
    :class:`MoE` layer in the model, in call order, still attached to the graph (an auxiliary loss on them trains
    the routers). Forward hooks on the routers, removed on exit."""
    recorded: list[torch.Tensor] = []
    handles = [m.router.register_forward_hook(lambda _mod, _inp, out: recorded.append(out))
               for m in model.modules() if isinstance(m, MoE)]
    if not handles:
        raise ValueError(f"{type(model).__name__} has no MoE layer whose router logits could be recorded")
    try:
        yield recorded
    finally:
        for handle in handles:
            handle.remove()
