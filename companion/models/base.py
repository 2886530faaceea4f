"""Pieces shared by the chapter 5 models: the context-length check, weight initialisation and greedy decoding.

Greedy decoding here is the reference used by the parity tests (argmax at every step, optionally with a KV cache);
sampling strategies and faster caches belong to chapter 10 (inference).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from companion.nn.attention import KVCache, KVCacheLike
from companion.objectives import causal_lm_loss, fused_causal_lm_loss


def check_length(t: int, n_ctx: int, offset: int = 0) -> None:
    """Raise if positions ``offset .. offset + t - 1`` do not fit a context of ``n_ctx`` positions."""
    if t < 1:
        raise ValueError(f"need at least one token, got sequence length {t}")
    if offset + t > n_ctx:
        cached = f" after {offset} cached tokens" if offset else ""
        raise ValueError(f"sequence length {t}{cached} exceeds the context length n_ctx={n_ctx}")


def start_position(idx: torch.Tensor, kv_caches: Sequence[KVCacheLike] | None, n_ctx: int) -> int:
    """Validate decoder input ids (B, T) and return the position of their first token (tokens already cached)."""
    if idx.dim() != 2:
        raise ValueError(f"idx must have shape (B, T), got {tuple(idx.shape)}")
    offset = 0 if kv_caches is None else kv_caches[0].seq_len
    check_length(idx.shape[1], n_ctx, offset)
    return offset


def padded_positions_and_mask(idx: torch.Tensor, attention_mask: torch.Tensor,
                              offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) and the self-attention mask (B, 1, T, S) of a padded batch, as transformers builds them.

    ``attention_mask`` (B, S), S = offset + T, is 1 (or True) for real tokens and 0 for padding, over the cached and
    the new positions. A token's position counts the real tokens before it (``cumsum - 1``, clamped at 0 for left
    padding), so a left-padded row gets the same positions as the row alone. The mask lets query i see key j when j
    is real and not in its future; a query with nothing to see (a pad before the first real token) sees every key,
    which keeps softmax finite; its output is never read.
    """
    b, t = idx.shape
    if attention_mask.shape != (b, offset + t):
        raise ValueError(f"attention_mask must have shape (B, S) = {(b, offset + t)} (cached + new positions), "
                         f"got {tuple(attention_mask.shape)}")
    real = attention_mask.bool()  # (B, S)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, offset:]  # (B, T)
    s = offset + t
    causal = torch.ones(t, s, dtype=torch.bool, device=idx.device).tril(diagonal=offset)  # (T, S)
    allowed = causal & real[:, None, :]  # (B, T, S)
    allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # rows with no key: see all (finite, never read)
    return positions, allowed[:, None]  # (B, T), (B, 1, T, S)


def lm_loss(hidden: torch.Tensor, lm_head: nn.Module, labels: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """The causal LM loss of ``lm_head(hidden)``: by `fused_causal_lm_loss` (no logits) when the head is a plain
    bias-free nn.Linear, else from its logits (a LoRA, quantized or otherwise wrapped head computes its own output)."""
    if type(lm_head) is nn.Linear and lm_head.bias is None:
        return fused_causal_lm_loss(hidden, lm_head.weight, labels, z_loss=z_loss)
    return causal_lm_loss(lm_head(hidden), labels, z_loss=z_loss)  # (B, T, V) vs (B, T)


class CausalLM(nn.Module):
    """A decoder-only language model: subclasses define ``features`` (final hidden states) and ``lm_head``."""

    lm_head: nn.Module

    def features(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 kv_caches: Sequence[KVCacheLike] | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None,
                kv_caches: Sequence[KVCacheLike] | None = None, *, labels: torch.Tensor | None = None,
                z_loss: float = 0.0) -> torch.Tensor:
        """Logits (B, T, V); with ``labels`` (B, T) the causal LM loss instead, from the final hidden states by
        `lm_loss` (the fused head: no logits are formed; the training path of `companion.training`)."""
        hidden = self.features(idx, attention_mask, kv_caches)  # (B, T, C)
        if labels is not None:
            return lm_loss(hidden, self.lm_head, labels, z_loss)
        return self.lm_head(hidden)  # (B, T, V)


def init_weights(module: nn.Module, std: float = 0.02) -> None:
    """GPT-2/BERT initialisation: N(0, std) for linear and embedding weights, zero biases (norms keep ones/zeros)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)


@torch.no_grad()
def greedy_generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, *, use_cache: bool = True,
                    eos_id: int | None = None) -> torch.Tensor:
    """Append up to ``max_new_tokens`` argmax tokens to idx (B, T) with a decoder-only model; returns (B, T + new).

    ``model(idx, kv_caches=...)`` must return logits (B, T, V) and have a ``config.n_layers``. With ``use_cache`` the
    prompt is run once and each new token alone (same tokens as without the cache, which the tests check). With
    ``eos_id``, a row that has produced it keeps producing it, and decoding stops once every row has.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens!r}")
    was_training = model.training
    model.eval()
    caches = [KVCache() for _ in range(model.config.n_layers)] if use_cache else None
    out, step_input = idx, idx
    done = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)  # (B, 1) rows that produced eos_id
    for _ in range(max_new_tokens):
        logits = model(step_input if use_cache else out, kv_caches=caches)  # (B, T, V)
        next_token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        if eos_id is not None:
            next_token = next_token.masked_fill(done, eos_id)
            done = done | (next_token == eos_id)
        out = torch.cat([out, next_token], dim=1)
        step_input = next_token
        if eos_id is not None and bool(done.all()):
            break
    model.train(was_training)
    return out
