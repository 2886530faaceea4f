"""Decoding settings (`GenerationConfig`), the result type, and the logits processors that carry the settings out.

Sampling filters: top-k (Fan et al., 2018), nucleus / top-p (Holtzman et al., 2020), min-p (Nguyen et al., 2024);
the repetition penalty of Keskar et al. (2019, CTRL). Each computes what the transformers LogitsProcessor of the
same name computes, and `process_logits` applies them in transformers' order (penalty, temperature, top-k, top-p,
min-p); the tests check both. Shared by `decoding`, `beam_search` and `speculative`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class GenerationConfig:
    """How to choose each new token and when to stop."""

    max_new_tokens: int = 64  # at most this many tokens per row
    do_sample: bool = False  # False: greedy (or beam search if num_beams > 1); True: sample from the filtered softmax
    temperature: float = 1.0  # divides the logits before sampling (< 1 sharper, > 1 flatter)
    top_k: int | None = None  # sample among the k most likely tokens only (None: no limit)
    top_p: float | None = None  # sample from the smallest set of tokens with total probability >= p (None: all)
    min_p: float | None = None  # drop tokens less likely than min_p times the most likely one (None: keep)
    repetition_penalty: float = 1.0  # > 1 makes every token already in the row less likely (CTRL's rule)
    num_beams: int = 1  # > 1: beam search (greedy only)
    eos_token_id: int | tuple[int, ...] | None = None  # a row ends when it produces one of these
    stop_sequences: tuple[tuple[int, ...], ...] = ()  # token-id sequences that end a row (matched in new tokens)
    use_cache: bool = True  # False: rerun the whole sequence every step (the slow reference)
    seed: int | None = None  # seeds the torch.Generator used for sampling (None: the global generator)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {self.top_k!r}")
        for name in ("top_p", "min_p"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1] or None, got {value!r}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {self.num_beams!r}")
        if self.num_beams > 1 and self.do_sample:
            raise ValueError(f"beam search is greedy here: num_beams={self.num_beams} needs do_sample=False")
        if any(len(s) == 0 for s in self.stop_sequences):
            raise ValueError(f"stop sequences must be non-empty, got {self.stop_sequences!r}")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)


@dataclass(frozen=True)
class GenerationOutput:
    """What `generate` returns. ``new_tokens`` exclude the eos token or stop sequence that ended a row (they stay in
    ``sequences``, as transformers keeps them)."""

    sequences: torch.Tensor  # (B, T + N) prompt as given (left padding kept) + new tokens, right-padded with pad id
    new_tokens: list[list[int]]  # per row, the generated ids before eos / stop sequence
    finish_reasons: list[str]  # per row, "stop" (eos or stop sequence) or "length"


# logits processors: logits (B, V) -> logits (B, V), filtered tokens set to -inf

def apply_repetition_penalty(logits: torch.Tensor, input_ids: torch.Tensor, penalty: float,
                             attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """CTRL's penalty on every token id present in input_ids (B, T): logit / penalty if > 0, else logit * penalty.
    With ``attention_mask`` (B, T), padding positions do not count."""
    seen = torch.zeros_like(logits, dtype=torch.int32)  # (B, V) occurrences
    counts = torch.ones_like(input_ids, dtype=torch.int32) if attention_mask is None else attention_mask.int()
    seen = seen.scatter_add(1, input_ids, counts) > 0  # (B, V)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept too, as in transformers)."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: drop the least likely tokens whose total probability is at most 1 - p (at least one stays)."""
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # (B, V)
    drop = cumulative <= 1 - p
    drop[..., -1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's largest probability."""
    probs = logits.softmax(dim=-1)  # (B, V)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def process_logits(logits: torch.Tensor, input_ids: torch.Tensor, config: GenerationConfig,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """All of ``config``'s processors in transformers' order; the sampling filters only when ``do_sample``."""
    if config.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, input_ids, config.repetition_penalty, attention_mask)
    if config.do_sample:
        if config.temperature != 1.0:
            logits = logits / config.temperature
        if config.top_k is not None:
            logits = apply_top_k(logits, config.top_k)
        if config.top_p is not None and config.top_p < 1.0:
            logits = apply_top_p(logits, config.top_p)
        if config.min_p is not None:
            logits = apply_min_p(logits, config.min_p)
    return logits


def last_logits(model: nn.Module, ids: torch.Tensor, attention_mask: torch.Tensor | None,
                kv_caches: list | None) -> torch.Tensor:
    """Logits (B, V) of the last position; only that position goes through the output head when the model has
    ``features`` and ``lm_head`` (`companion.GPT`, `companion.Llama`)."""
    if hasattr(model, "features") and hasattr(model, "lm_head"):
        hidden = model.features(ids, attention_mask, kv_caches)  # (B, T, C)
        return model.lm_head(hidden[:, -1])  # (B, V)
    return model(ids, attention_mask=attention_mask, kv_caches=kv_caches)[:, -1]  # (B, V)
