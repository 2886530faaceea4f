"""Autoregressive decoding: greedy, sampling (filters in `companion.inference.processors`), stop sequences, beam
search (`companion.inference.beam_search`) and a streaming generator.

Batches may be left-padded (``attention_mask``; positions and masks as in transformers). Every step runs only the
new token through the model, with a `companion.inference.kv_cache.PreallocatedKVCache` per layer, and only the last
position through the output head. Greedy and beam search are token-identical to ``transformers.generate`` (tests).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from companion.inference.beam_search import beam_search
from companion.inference.kv_cache import allocate_kv_caches
from companion.inference.processors import GenerationConfig, GenerationOutput, last_logits, process_logits

__all__ = ["GenerationConfig", "GenerationOutput", "generate", "stream"]


def _check_inputs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  config: GenerationConfig) -> None:
    if input_ids.dim() != 2 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape (B, T) with T >= 1, got {tuple(input_ids.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    total = input_ids.shape[1] + config.max_new_tokens
    if total > model.config.n_ctx:
        raise ValueError(f"prompt of {input_ids.shape[1]} tokens + max_new_tokens={config.max_new_tokens} exceeds "
                         f"the model's context length n_ctx={model.config.n_ctx}")


class _Row:
    """Bookkeeping of one row: its new tokens, whether and why it finished."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.reason: str | None = None

    def push(self, token: int, config: GenerationConfig) -> None:
        if token in config.eos_ids:
            self.reason = "stop"
            return
        self.tokens.append(token)
        for stop in config.stop_sequences:
            if tuple(self.tokens[-len(stop):]) == stop:
                del self.tokens[-len(stop):]
                self.reason = "stop"
                return


def _decode(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            config: GenerationConfig, pad_token_id: int) -> Iterator[tuple[torch.Tensor, list[_Row]]]:
    """Yield (sequences so far (B, T + n), rows) after each new token n = 1, 2, ... until every row has finished."""
    b, t = input_ids.shape
    n = config.max_new_tokens
    padded = attention_mask is not None and not bool(attention_mask.bool().all())
    full_mask = None  # (B, T + N), new tokens always count as real
    if padded:
        full_mask = torch.ones(b, t + n, dtype=torch.long, device=input_ids.device)
        full_mask[:, :t] = attention_mask
    seqs = torch.full((b, t + n), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    seqs[:, :t] = input_ids
    caches = allocate_kv_caches(model, b, t + n) if config.use_cache else None
    generator = None
    if config.do_sample and config.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(config.seed)
    rows = [_Row() for _ in range(b)]
    finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
    step_ids, length = input_ids, t
    for _ in range(n):
        mask = None if full_mask is None else full_mask[:, :length]
        if config.use_cache:
            logits = last_logits(model, step_ids, mask, caches)  # (B, V)
        else:
            logits = last_logits(model, seqs[:, :length], mask, None)  # (B, V)
        logits = process_logits(logits.float(), seqs[:, :length], config, mask)
        if config.do_sample:
            next_ids = torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)[:, 0]  # (B,)
        else:
            next_ids = logits.argmax(dim=-1)  # (B,)
        next_ids = next_ids.masked_fill(finished, pad_token_id)
        seqs[:, length] = next_ids
        length += 1
        for row, token in zip(rows, next_ids.tolist()):
            if row.reason is None:
                row.push(token, config)
        finished = torch.tensor([row.reason is not None for row in rows], device=input_ids.device)
        yield seqs[:, :length], rows
        if bool(finished.all()):
            return
        step_ids = next_ids[:, None]  # (B, 1)


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             config: GenerationConfig = GenerationConfig(), *, pad_token_id: int = 0) -> GenerationOutput:
    """Continue each row of input_ids (B, T) (left-padded, with ``attention_mask`` (B, T), when rows differ in length).

    ``model(ids, attention_mask=None, kv_caches=None)`` returns logits (B, T, V) and has ``config.n_layers`` and
    ``config.n_ctx``. Decoding stops when every row has finished or after ``max_new_tokens``; a finished row gets
    ``pad_token_id`` from then on. ``num_beams > 1`` runs `companion.inference.beam_search.beam_search`.
    """
    _check_inputs(model, input_ids, attention_mask, config)
    if config.num_beams > 1:
        return beam_search(model, input_ids, attention_mask, config, pad_token_id=pad_token_id)
    was_training = model.training
    model.eval()
    try:
        seqs, rows = input_ids, [_Row() for _ in range(input_ids.shape[0])]
        for seqs, rows in _decode(model, input_ids, attention_mask, config, pad_token_id):
            pass
    finally:
        model.train(was_training)
    return GenerationOutput(sequences=seqs.clone(), new_tokens=[row.tokens for row in rows],
                            finish_reasons=[row.reason or "length" for row in rows])


def stream(model: nn.Module, input_ids: torch.Tensor, config: GenerationConfig = GenerationConfig(),
           attention_mask: torch.Tensor | None = None) -> Iterator[int]:
    """Yield the new token ids of a single row (input_ids (1, T)) as soon as they are final.

    The ids are exactly ``generate(...).new_tokens[0]``: eos is not yielded, and a token that could begin a stop
    sequence is held back until the sequence is ruled out (then released) or completed (then dropped).
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"stream decodes one row: input_ids must have shape (1, T), got {tuple(input_ids.shape)}")
    if config.num_beams > 1:
        raise ValueError(f"beam search cannot stream (its best row is known only at the end), got num_beams="
                         f"{config.num_beams}")
    _check_inputs(model, input_ids, attention_mask, config)
    was_training = model.training
    model.eval()
    sent = 0  # tokens of row 0 already yielded
    try:
        steps = _decode(model, input_ids, attention_mask, config, pad_token_id=0)
        while True:
            with torch.inference_mode():  # only around the model's work: the caller runs between yields
                item = next(steps, None)
            if item is None:
                break
            row = item[1][0]
            final = len(row.tokens) if row.reason is not None else _safe_prefix(row.tokens, config)
            yield from row.tokens[sent:final]
            sent = max(sent, final)
    finally:
        model.train(was_training)


def _safe_prefix(tokens: list[int], config: GenerationConfig) -> int:
    """Length of the prefix of ``tokens`` that no stop sequence can still claim."""
    held = 0
    for stop in config.stop_sequences:
        for k in range(min(len(stop) - 1, len(tokens)), 0, -1):
            if tuple(tokens[-k:]) == stop[:k]:
                held = max(held, k)
                break
    return len(tokens) - held
