"""Pretraining objectives: the causal LM loss (GPT, Radford et al., 2018) with an optional z-loss (PaLM), BERT's masked LM with the 80/10/10
rule and next-sentence prediction (Devlin et al., 2019).

The same causal loss from the final hidden states and the output matrix, without forming the logits:
`linear_cross_entropy` / `fused_causal_lm_loss` (the fused output head of ``GPT``/``Llama`` ``labels=``).

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



# ------------------------------------------------------------------ the loss from hidden states: a fused output head
def default_chunk_rows(vocab_size: int) -> int:
    """Rows of logits `linear_cross_entropy` forms at a time: about 2^21 logits (8 MiB in float32), 16 to 1024 rows."""
    return max(16, min(1024, 2**21 // max(vocab_size, 1)))


class _LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of ``hidden @ weight.T`` whose gradients are computed in the forward, chunk by chunk.

    The (N, V) logits never exist at once: for each block of rows the logits are formed, turned into the per-row loss
    and into d loss / d logits = softmax(1 + 2 z log Z) - onehot (zero on ignored rows), and multiplied straight into
    d hidden (N, C) and d weight (V, C). Only those two are saved; the backward scales them by the incoming gradient
    (a GradScaler's scale, a micro-batch weight). The matrix products are those of the plain head (three per row), in
    the autocast dtype when autocast is on; softmax and the sums run in at least float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, mean, z_loss, chunk, need_grad):  # noqa: D102
        dtype = hidden.dtype
        if torch.is_autocast_enabled(hidden.device.type) and dtype in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.get_autocast_dtype(hidden.device.type)
        acc = torch.promote_types(dtype, torch.float32)  # softmax, loss and d weight accumulate here
        with torch.autocast(hidden.device.type, enabled=False):
            h_all, w = hidden.to(dtype), weight.to(dtype)  # (N, C), (V, C)
            counted_all = labels != ignore_index  # (N,)
            # each row's weight in the loss: 0 if ignored, else 1 / (counted rows) for the mean, 1 for the sum.
            # Folded into d loss / d logits, so d hidden and d weight need no pass of their own; but float16 would
            # flush softmax / N to zero (its smallest normal is 6e-5), so there the mean scales them afterwards.
            row_weight = counted_all.to(acc)  # (N,)
            scale = 1 / counted_all.sum().to(acc) if mean else None
            wide = torch.finfo(dtype).tiny <= torch.finfo(torch.float32).tiny  # float32's exponent range
            if scale is not None and wide:
                row_weight, scale = row_weight * scale, None
            total = torch.zeros((), dtype=acc, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_grad[0] else None  # (N, C)
            grad_w = None  # (V, C) in acc, written by the first chunk and accumulated in place by the others
            for start in range(0, hidden.shape[0], chunk):
                h, y = h_all[start:start + chunk], labels[start:start + chunk]  # (n, C), (n,)
                r = row_weight[start:start + chunk]  # (n,)
                logits = (h @ w.t()).to(acc)  # (n, V)
                log_z = torch.logsumexp(logits, dim=-1)  # (n,)
                counted = counted_all[start:start + chunk]  # (n,)
                target = y.masked_fill(~counted, 0)  # (n,): a valid index on ignored rows, which count 0
                row = log_z - logits.gather(1, target[:, None])[:, 0]  # (n,) -log p(y)
                if z_loss:
                    row = row + z_loss * log_z.square()
                total += (row * r).masked_fill(~counted, 0).sum()
                if not (need_grad[0] or need_grad[1]):
                    continue
                g = logits.sub_(log_z[:, None]).exp_()  # (n, V) softmax, in place of the logits
                g.mul_((r * (1 + 2 * z_loss * log_z) if z_loss else r)[:, None])
                g[torch.arange(g.shape[0], device=g.device), target] -= r  # d loss / d logits, row weight included
                g = g.to(dtype)
                if grad_h is not None:
                    rows = grad_h[start:start + chunk]  # (n, C), written in place
                    if dtype == hidden.dtype:
                        torch.mm(g, w, out=rows)
                    else:
                        rows.copy_(g @ w)
                if need_grad[1]:
                    if grad_w is None:
                        grad_w = (g.t() @ h).to(acc)  # (V, C)
                    elif dtype == acc:
                        grad_w.addmm_(g.t(), h)  # one product, accumulated in place
                    else:
                        grad_w += g.t() @ h  # a bfloat16/float16 product added into the float32 sum
            if scale is not None:  # float16: the mean's 1 / N, applied to the float32 results
                grad_h = None if grad_h is None else grad_h.mul_(scale.to(grad_h.dtype))
                grad_w = None if grad_w is None else grad_w.mul_(scale)
                total = total * scale
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype))
        return total.to(torch.promote_types(hidden.dtype, torch.float32))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):  # noqa: D102
        grad_h, grad_w = ctx.saved_tensors
        # the loss is usually the whole objective (d loss = 1): then the saved gradients are the answer, as they are
        if torch.compiler.is_compiling() or not bool(grad_loss == 1):
            grad_h = None if grad_h is None else grad_h * grad_loss.to(grad_h.dtype)
            grad_w = None if grad_w is None else grad_w * grad_loss.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean", z_loss: float = 0.0,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """``token_cross_entropy(hidden @ weight.T, labels)`` (+ ``z_loss`` times the z-term) without the (N, V) logits.

    hidden: (..., C) final hidden states; weight: (V, C), the output head (a tied embedding); labels: (...). Rows are
    processed ``chunk_rows`` at a time (default `default_chunk_rows`), and the gradients are formed in the same pass
    (the fused linear cross-entropy of Liger Kernel, Hsu et al., 2024; Cut Cross-Entropy, Wijmans et al., 2025,
    recomputes the logits in the backward instead of saving d weight):
    the memory of the head falls from N x V float32 logits and their log-softmax to d hidden and d weight, and a CPU
    training step saves the log-softmax's passes over N x V memory (`benchmarks/train_step.py`). Equal to the plain
    loss and its gradients to float rounding (tests). The gradients cost two matrix products in the forward, which is
    why the forward skips them when nothing needs a gradient (under ``torch.no_grad`` or for frozen tensors); it is
    differentiable once (no double backward).
    """
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} disagree: hidden must be "
                         "labels.shape + (C,)")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be (V, {hidden.shape[-1]}), got shape {tuple(weight.shape)}")
    if not (isinstance(reduction, str) and reduction in ("mean", "sum")):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows!r}")
    flat_labels = labels.reshape(-1)  # (N,)
    # the check reads a value back (a graph break for torch.compile, which skips it: an all-ignored batch gives NaN)
    if reduction == "mean" and not torch.compiler.is_compiling() and not bool((flat_labels != ignore_index).any()):
        raise ValueError(f"every label equals ignore_index={ignore_index}: the mean loss is undefined")
    grad = torch.is_grad_enabled()
    need_grad = (grad and hidden.requires_grad, grad and weight.requires_grad)
    chunk = chunk_rows or default_chunk_rows(weight.shape[0])
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, flat_labels, ignore_index,
                                     reduction == "mean", float(z_loss), chunk, need_grad)


def fused_causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean", z_loss: float = 0.0,
                         chunk_rows: int | None = None) -> torch.Tensor:
    """`causal_lm_loss` (z-loss included) of the logits ``hidden @ weight.T``, by `linear_cross_entropy`.

    hidden: (B, T, C); weight: (V, C); labels: (B, T) unshifted. The labels shift instead of the hidden states (row t
    is scored against label t + 1, the last row against nothing), so no (B, T - 1, C) copy is made.
    """
    if hidden.dim() != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"fused_causal_lm_loss expects hidden (B, T, C) and labels (B, T), got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    if hidden.shape[1] < 2:
        raise ValueError(f"need at least 2 positions to predict a next token, got T={hidden.shape[1]}")
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)  # (B, T): the last position has no target
    return linear_cross_entropy(hidden, weight, shifted, ignore_index, reduction, z_loss, chunk_rows)

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
