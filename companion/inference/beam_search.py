"""Beam search: keep the K most likely partial continuations of each prompt, extend each by every token, keep the
best K again; a continuation that ends (eos, or the length limit) becomes a finished hypothesis scored by its
log-probability divided by its length.

The search of Sutskever et al. (2014) and Wu et al. (2016, GNMT; length normalisation), written to make the same
choices as transformers' vectorised ``_beam_search`` with its defaults (``length_penalty=1.0``,
``early_stopping=False``): 2K candidates per step so that K live beams remain after some end, only candidates
among the top K may finish, and the search stops once no live beam can beat the worst finished one. The tests check
token-identical output against ``transformers.generate(num_beams=K)``.
"""

from __future__ import annotations

import torch
from torch import nn

from companion.inference.processors import GenerationConfig, GenerationOutput, last_logits, process_logits
from companion.inference.kv_cache import allocate_kv_caches

_NEG = -1.0e9  # the "impossible" score transformers uses


def beam_search(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                config: GenerationConfig, *, pad_token_id: int = 0) -> GenerationOutput:
    """Beam search with ``config.num_beams`` = K beams per row of input_ids (B, T); returns the best hypothesis of
    each row. Called by `companion.inference.decoding.generate` (which validates the inputs)."""
    if config.stop_sequences:
        raise ValueError(f"beam search supports eos_token_id, not stop_sequences, got {config.stop_sequences!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _search(model, input_ids, attention_mask, config, pad_token_id)
    finally:
        model.train(was_training)


def _search(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
            config: GenerationConfig, pad_token_id: int) -> GenerationOutput:
    b, t = input_ids.shape
    k, n, dev = config.num_beams, config.max_new_tokens, input_ids.device
    eos = torch.tensor(config.eos_ids, dtype=torch.long, device=dev)
    keep = max(2, 1 + len(config.eos_ids)) * k  # candidates per row and step
    top_k_mask = torch.arange(keep, device=dev) < k  # (2K,) only the best K candidates may finish
    max_len = t + n
    running = torch.full((b, k, max_len), pad_token_id, dtype=torch.long, device=dev)  # (B, K, T + N)
    running[:, :, :t] = input_ids[:, None]
    running_scores = torch.zeros(b, k, device=dev)
    running_scores[:, 1:] = _NEG  # all beams start identical: only the first one counts at step 1
    done = running.clone()  # finished hypotheses (B, K, T + N), their scores and lengths
    done_scores = torch.full((b, k), _NEG, device=dev)
    done_lengths = torch.zeros(b, k, dtype=torch.long, device=dev)
    is_done = torch.zeros(b, k, dtype=torch.bool, device=dev)
    improvable = torch.ones(b, 1, dtype=torch.bool, device=dev)
    mask = None
    if attention_mask is not None and not bool(attention_mask.bool().all()):
        mask = torch.ones(b * k, max_len, dtype=torch.long, device=dev)
        mask[:, :t] = attention_mask.repeat_interleave(k, dim=0)
    caches = allocate_kv_caches(model, b * k, max_len) if config.use_cache else None
    flat = input_ids.repeat_interleave(k, dim=0)  # (B*K, T)
    cur = t
    for _ in range(n):
        step_mask = None if mask is None else mask[:, :cur]
        step_ids = flat if not config.use_cache or cur == t else flat[:, -1:]
        logits = last_logits(model, step_ids, step_mask, caches).float()  # (B*K, V)
        log_probs = process_logits(logits.log_softmax(dim=-1), flat, config, step_mask)  # (B*K, V)
        v = log_probs.shape[-1]
        totals = (log_probs.view(b, k, v) + running_scores[:, :, None]).view(b, k * v)  # (B, K*V)
        cand_scores, cand = torch.topk(totals, keep, dim=-1)  # (B, 2K)
        parent, token = cand // v, cand % v  # (B, 2K)
        cand_seqs = running.gather(1, parent[:, :, None].expand(b, keep, max_len)).clone()  # (B, 2K, T + N)
        cand_seqs[:, :, cur] = token
        ends = torch.isin(token, eos) | (cur + 1 >= max_len)  # (B, 2K)

        # live beams: the best K candidates that did not end
        live_scores = cand_scores + ends.float() * _NEG
        live = torch.topk(live_scores, k, dim=-1).indices  # (B, K)
        running = cand_seqs.gather(1, live[:, :, None].expand(b, k, max_len))
        running_scores = live_scores.gather(1, live)
        beam_parent = parent.gather(1, live)  # (B, K) which old beam each live beam extends

        # finished hypotheses: merge the candidates that just ended (among the top K) with the kept ones
        finished_now = ends & top_k_mask[None]
        norm_scores = cand_scores / (cur + 1 - t) + (~improvable).float() * _NEG + (~finished_now).float() * _NEG
        merged_scores = torch.cat([done_scores, norm_scores], dim=1)  # (B, 3K)
        best = torch.topk(merged_scores, k, dim=-1).indices  # (B, K)
        done = torch.cat([done, cand_seqs], dim=1).gather(1, best[:, :, None].expand(b, k, max_len))
        done_scores = merged_scores.gather(1, best)
        lengths_now = torch.full((b, keep), cur + 1 - t, dtype=torch.long, device=dev)
        done_lengths = torch.cat([done_lengths, lengths_now], dim=1).gather(1, best)
        is_done = torch.cat([is_done, finished_now], dim=1).gather(1, best)

        if caches is not None:  # each live beam continues from its parent's cache
            order = (beam_parent + torch.arange(b, device=dev)[:, None] * k).view(-1)  # (B*K,)
            for cache in caches:
                cache.reorder(order)
        cur += 1
        flat = running[:, :, :cur].reshape(b * k, cur)
        best_possible = running_scores[:, :1] / (cur - t)
        worst_done = torch.where(is_done, done_scores.min(dim=1, keepdim=True).values, torch.full_like(done_scores, _NEG))
        improvable = improvable & (best_possible > worst_done).any(dim=-1, keepdim=True)
        if not bool(improvable.any()) or bool(ends.all()):
            break

    lengths = done_lengths[:, 0]  # (B,) new tokens of each row's best hypothesis (eos included)
    width = t + int(lengths.max())
    sequences = done[:, 0, :width].clone()
    new_tokens, reasons = [], []
    for row, length in enumerate(lengths.tolist()):
        ids = sequences[row, t:t + length].tolist()
        ended = bool(ids) and ids[-1] in config.eos_ids
        new_tokens.append(ids[:-1] if ended else ids)
        reasons.append("stop" if ended else "length")
    return GenerationOutput(sequences=sequences, new_tokens=new_tokens, finish_reasons=reasons)
