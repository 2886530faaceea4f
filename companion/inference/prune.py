"""Pruning: unstructured magnitude pruning and structured pruning of feed-forward hidden units.

Magnitude pruning (Han et al., 2015, "Learning both Weights and Connections") zeroes the weights of smallest
|w|, per layer or over all layers at once (global); the masks equal ``torch.nn.utils.prune.l1_unstructured`` /
``global_unstructured``. The matrices keep their shape: the zeros save space only in a sparse format.
Structured pruning removes whole FFN hidden units (rows of ``up``/``gate``, columns of ``down``) ranked by an
importance score, so the matrices really shrink (LLM-Pruner, Ma et al. 2023, prunes such coupled groups).
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import torch
from torch import nn

from companion.nn.layers import FeedForward

Scope = Literal["layer", "global"]


def prunable_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Linear]:
    """The nn.Linear modules of ``model`` by name, except those matching a ``skip`` fnmatch pattern
    (by default the LM head, which a GPT ties to its embedding)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and not any(fnmatch.fnmatchcase(name, p) for p in skip)}


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must lie in [0, 1), got {sparsity!r}")


def magnitude_masks(weights: dict[str, torch.Tensor], sparsity: float,
                    scope: Scope = "layer") -> dict[str, torch.Tensor]:
    """Boolean keep-masks: the ``round(sparsity * n)`` smallest |w| are dropped, within each tensor ("layer")
    or among all tensors together ("global", so layers end up with different sparsities)."""
    _check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")

    def keep(scores: torch.Tensor) -> torch.Tensor:
        k = round(sparsity * scores.numel())
        mask = torch.ones(scores.numel(), dtype=torch.bool)
        if k:
            mask[torch.topk(scores.flatten(), k, largest=False).indices] = False
        return mask.view_as(scores)

    if scope == "layer":
        return {name: keep(w.detach().abs()) for name, w in weights.items()}
    flat = keep(torch.cat([w.detach().abs().flatten() for w in weights.values()]))
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = flat[start:start + w.numel()].view_as(w)
        start += w.numel()
    return masks


@torch.no_grad()
def magnitude_prune(model: nn.Module, sparsity: float, scope: Scope = "layer",
                    skip: tuple[str, ...] = ("lm_head",)) -> dict[str, torch.Tensor]:
    """Zero the smallest-magnitude weights of every prunable Linear in place; returns the keep-masks."""
    linears = prunable_linears(model, skip)
    masks = magnitude_masks({name: m.weight for name, m in linears.items()}, sparsity, scope)
    for name, m in linears.items():
        m.weight.mul_(masks[name])
    return masks


def sparsity_of(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> float:
    """Share of exactly-zero weights among the prunable Linear weights."""
    ws = [m.weight for m in prunable_linears(model, skip).values()]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def ffn_importance(ffn: FeedForward) -> torch.Tensor:
    """Score (hidden,) of each hidden unit j: ||up_j|| * ||down_{:,j}|| (times ||gate_j|| for SwiGLU), the
    product of the norms of the weights through which the unit reads and writes the residual stream."""
    score = ffn.up.weight.detach().norm(dim=1) * ffn.down.weight.detach().norm(dim=0)  # (hidden,)
    if ffn.gate is not None:
        score = score * ffn.gate.weight.detach().norm(dim=1)
    return score


def ffn_keep(ffn: FeedForward, fraction: float) -> torch.Tensor:
    """Sorted indices of the ``round((1 - fraction) * hidden)`` most important hidden units (at least one)."""
    _check_sparsity(fraction)
    score = ffn_importance(ffn)
    n_keep = max(1, round((1 - fraction) * score.numel()))
    return torch.topk(score, n_keep).indices.sort().values


def _rows(linear: nn.Linear, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A new Linear keeping output rows (dim=0) or input columns (dim=1) ``idx`` of ``linear``."""
    w = linear.weight.detach().index_select(dim, idx)
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
    new.weight = nn.Parameter(w.clone())
    if linear.bias is not None:
        b = linear.bias.detach()
        new.bias = nn.Parameter((b.index_select(0, idx) if dim == 0 else b).clone())
    return new


@torch.no_grad()
def prune_ffn(model: nn.Module, fraction: float) -> dict[str, torch.Tensor]:
    """Remove ``fraction`` of the hidden units of every FeedForward in ``model`` (in place), by
    `ffn_importance`; returns the kept indices per FFN. The model's config still states the old width."""
    kept = {}
    for name, ffn in model.named_modules():
        if isinstance(ffn, FeedForward):
            idx = kept[name] = ffn_keep(ffn, fraction)
            ffn.up = _rows(ffn.up, idx, 0)
            if ffn.gate is not None:
                ffn.gate = _rows(ffn.gate, idx, 0)
            ffn.down = _rows(ffn.down, idx, 1)
    return kept


@torch.no_grad()
def mask_ffn(model: nn.Module, kept: dict[str, torch.Tensor]) -> None:
    """The masked counterpart of `prune_ffn`: zero the ``down`` columns of the dropped units (same function)."""
    for name, ffn in model.named_modules():
        if name in kept:
            drop = torch.ones(ffn.down.in_features, dtype=torch.bool)
            drop[kept[name]] = False
            ffn.down.weight[:, drop] = 0.0
