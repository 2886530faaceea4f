"""Pretraining objectives: the causal LM loss (GPT, Radford et al., 2018) with an optional z-loss (PaLM), BERT's masked LM with the 80/10/10
rule and next-sentence prediction (Devlin et al., 2019).

Design choices: losses take logits and labels (no model inside), labels use ``IGNORE_INDEX`` = -100 for
positions that do not count, and every random choice draws from an explicit ``torch.Generator`` or
``random.Random`` so that masks and pairs are reproducible. Label conventions follow Hugging Face
(``BertForPreTraining``: NSP label 0 = "B follows A", 1 = "B is random"). NSP is BERT's objective only;
RoBERTa (Liu et al., 2019) showed it can be dropped, and GPT-style models never used it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that torch.nn.functional.cross_entropy ignores (its default ignore_index)
IS_NEXT, NOT_NEXT = 0, 1  # NSP labels (Hugging Face convention)


def _check_logits_labels(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() < 2:
        raise ValueError(f"logits must have a vocabulary dimension last, got shape {tuple(logits.shape)}")
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: "
                         "logits must be labels.shape + (V,)")


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                        reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy over every position whose label is not ``ignore_index``.

    logits: (..., V); labels: (...). ``reduction="mean"`` averages over counted positions (NaN-free: raises
    if there are none), ``"sum"`` adds them (for exact token-weighted averages across batches).
    Computed in at least float32 (bf16 log-softmax loses digits); float64 logits stay float64.
    """
    _check_logits_labels(logits, labels)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    flat_labels = labels.reshape(-1)  # (N,)
    if reduction == "mean" and not bool((flat_labels != ignore_index).any()):
        raise ValueError(f"every label equals ignore_index={ignore_index}: the mean loss is undefined")
    flat_logits = logits.reshape(-1, logits.shape[-1]).to(torch.promote_types(logits.dtype, torch.float32))  # (N, V)
    return F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction=reduction)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   reduction: str = "mean", z_loss: float = 0.0) -> torch.Tensor:
    """Next-token loss: position t predicts label t+1 (labels are the unshifted input ids, as in
    Hugging Face's ``*ForCausalLM``; padding already set to ``ignore_index``).

    logits: (B, T, V); labels: (B, T). The last position has no target and the first label is never predicted.
    ``z_loss`` > 0 adds ``z_loss * mean(logsumexp(logits)^2)`` over the counted positions (a sum with
    ``reduction="sum"``): the z-loss of PaLM (Chowdhery et al., 2022), which keeps the softmax normaliser
    near 1 so that large logits do not drift (see :func:`z_loss_term`). 0 (the default) adds nothing.
    """
    _check_logits_labels(logits, labels)
    if logits.dim() != 3:
        raise ValueError(f"causal_lm_loss expects logits (B, T, V), got shape {tuple(logits.shape)}")
    if logits.shape[1] < 2:
        raise ValueError(f"need at least 2 positions to predict a next token, got T={logits.shape[1]}")
    loss = token_cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index, reduction)  # (B, T-1, V) vs (B, T-1)
    if z_loss:
        loss = loss + z_loss * z_loss_term(logits[:, :-1], labels[:, 1:], ignore_index, reduction)
    return loss


def z_loss_term(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                reduction: str = "mean") -> torch.Tensor:
    """``mean(log Z^2)`` (or the sum) over the positions whose label is not ``ignore_index``, where
    ``log Z = logsumexp(logits, -1)`` is the log of the softmax normaliser. logits (..., V), labels (...).

    Cross-entropy does not change when a constant is added to all logits of a position; this term fixes that
    freedom at log Z = 0. Computed in at least float32, like :func:`token_cross_entropy`.
    """
    _check_logits_labels(logits, labels)
    if not (isinstance(reduction, str) and reduction in ("mean", "sum")):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    counted = labels != ignore_index  # (...)
    if reduction == "mean" and not bool(counted.any()):
        raise ValueError(f"every label equals ignore_index={ignore_index}: the mean z-loss is undefined")
    log_z = torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (...)
    squares = log_z.square()[counted]  # (N,)
    return squares.mean() if reduction == "mean" else squares.sum()


# ----------------------------------------------------------------------------------------- masked LM
@dataclass(frozen=True)
class MaskingConfig:
    """BERT's corruption of the input for masked language modelling."""

    probability: float = 0.15  # fraction of eligible tokens chosen as prediction targets
    mask_fraction: float = 0.8  # of the chosen: replaced by [MASK]
    random_fraction: float = 0.1  # of the chosen: replaced by a random non-special token (the rest stay)

    def __post_init__(self) -> None:
        if not 0 < self.probability < 1:
            raise ValueError(f"probability must be in (0, 1), got {self.probability!r}")
        if self.mask_fraction < 0 or self.random_fraction < 0 or self.mask_fraction + self.random_fraction > 1:
            raise ValueError(f"mask_fraction and random_fraction must be >= 0 with sum <= 1, got "
                             f"{self.mask_fraction!r} and {self.random_fraction!r}")


def mask_tokens(input_ids: torch.Tensor, mask_id: int, vocab_size: int, special_ids: Sequence[int] = (),
                attention_mask: torch.Tensor | None = None, config: MaskingConfig = MaskingConfig(),
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(corrupted_ids, labels)``, both (B, T), for masked LM.

    Each eligible position (not padding, not in ``special_ids``, not ``mask_id``) is chosen with
    ``config.probability``; a chosen one becomes ``mask_id`` (80%), a random token (10%) or stays (10%).
    ``labels`` hold the original id at chosen positions and ``IGNORE_INDEX`` elsewhere. Random draws happen
    in the same order as :class:`companion.pipeline.MaskedLMCollator`, so the two give the same masks.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id {mask_id!r} is outside the vocabulary [0, {vocab_size})")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} must match input_ids {tuple(input_ids.shape)}")
    never = sorted({*(int(i) for i in special_ids), int(mask_id)})
    eligible = ~torch.isin(input_ids, torch.tensor(never, dtype=torch.long))  # (B, T)
    if attention_mask is not None:
        eligible &= attention_mask.bool()
    chosen = (torch.rand(input_ids.shape, generator=generator) < config.probability) & eligible  # (B, T)
    labels = input_ids.masked_fill(~chosen, IGNORE_INDEX)  # (B, T)
    action = torch.rand(input_ids.shape, generator=generator)  # (B, T): which corruption each position gets
    allowed = torch.tensor([i for i in range(vocab_size) if i not in set(never)], dtype=torch.long)
    random_tokens = allowed[torch.randint(len(allowed), input_ids.shape, generator=generator)]  # (B, T)
    to_mask = chosen & (action < config.mask_fraction)
    to_random = chosen & (action >= config.mask_fraction) & (action < config.mask_fraction + config.random_fraction)
    corrupted = input_ids.masked_fill(to_mask, mask_id)
    corrupted = torch.where(to_random, random_tokens, corrupted)  # (B, T)
    return corrupted, labels


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """MLM loss: cross-entropy at the chosen positions only (no shift). logits (B, T, V), labels (B, T)."""
    return token_cross_entropy(logits, labels, ignore_index)


# ------------------------------------------------------------------------------- next-sentence prediction
def nsp_pairs(documents: Sequence[Sequence[Any]], rng: random.Random, random_probability: float = 0.5
              ) -> list[dict[str, Any]]:
    """Sentence pairs for next-sentence prediction, as rows ``{"first", "second", "label"}``.

    For every pair of consecutive sentences (A, B) of a document, keep B with probability
    ``1 - random_probability`` (label ``IS_NEXT`` = 0), else replace it by a sentence drawn uniformly from a
    *different* document (label ``NOT_NEXT`` = 1). Sentences may be strings or token-id lists; the rows feed
    :class:`companion.pipeline.PairCollator`, which adds ``[CLS] A [SEP] B [SEP]``.
    """
    if not 0 <= random_probability <= 1:
        raise ValueError(f"random_probability must be in [0, 1], got {random_probability!r}")
    docs = [list(d) for d in documents]
    usable = [i for i, d in enumerate(docs) if d]
    if random_probability > 0 and len(usable) < 2:
        raise ValueError(f"random pairs need at least 2 non-empty documents, got {len(usable)}")
    rows = []
    for i, doc in enumerate(docs):
        for a, b in zip(doc, doc[1:]):
            if rng.random() < random_probability:
                j = rng.choice([k for k in usable if k != i])
                rows.append({"first": a, "second": rng.choice(docs[j]), "label": NOT_NEXT})
            else:
                rows.append({"first": a, "second": b, "label": IS_NEXT})
    return rows


def bert_pretraining_loss(mlm_logits: torch.Tensor, mlm_labels: torch.Tensor, nsp_logits: torch.Tensor | None = None,
                          nsp_labels: torch.Tensor | None = None) -> torch.Tensor:
    """BERT's total loss: MLM (B, T, V) vs (B, T) plus, when given, NSP cross-entropy (B, 2) vs (B,)."""
    loss = masked_lm_loss(mlm_logits, mlm_labels)
    if (nsp_logits is None) != (nsp_labels is None):
        raise ValueError("nsp_logits and nsp_labels must be given together")
    if nsp_logits is not None:
        loss = loss + token_cross_entropy(nsp_logits, nsp_labels)
    return loss
