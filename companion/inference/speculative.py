"""Speculative decoding: a small draft model proposes k tokens, the target model checks all of them in one forward
pass, and every proposal up to the first disagreement is kept, plus the target's own next token.

Leviathan et al. (2023), "Fast Inference from Transformers via Speculative Decoding"; Chen et al. (2023),
"Accelerating Large Language Model Decoding with Speculative Sampling". Greedy verification keeps a proposal when it
is the target's argmax, so the output is exactly the target's greedy output, whatever the draft. With sampling, the
rejection rule (accept x ~ q with probability min(1, p(x)/q(x)), otherwise sample from max(0, p - q) normalised)
makes every token distributed exactly as the target's p. Both models keep a `PreallocatedKVCache` per layer, and
rejected positions are rolled back with ``crop``. One prompt at a time (batch 1), as in both papers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from companion.inference.processors import GenerationConfig, process_logits
from companion.inference.kv_cache import allocate_kv_caches


@dataclass(frozen=True)
class SpeculativeOutput:
    """New tokens and how the draft fared."""

    tokens: list[int]  # generated ids (an eos that ended decoding excluded, as in GenerationOutput.new_tokens)
    proposed: int  # draft tokens proposed in total
    accepted: int  # of those, kept
    target_calls: int  # forward passes of the target model (prefill included)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def tokens_per_target_call(self) -> float:
        """New tokens per target forward pass (1.0 for ordinary decoding)."""
        return len(self.tokens) / self.target_calls if self.target_calls else 0.0


def _probs(logits: torch.Tensor, ids: torch.Tensor, config: GenerationConfig) -> torch.Tensor:
    """Next-token distributions (N, V) after ``config``'s temperature / top-k / top-p / min-p."""
    n = logits.shape[0]
    return process_logits(logits.float(), ids.expand(n, -1), config).softmax(dim=-1)


@torch.inference_mode()
def speculative_generate(target: nn.Module, draft: nn.Module, input_ids: torch.Tensor,
                         config: GenerationConfig = GenerationConfig(), *, k: int = 4) -> SpeculativeOutput:
    """Decode up to ``config.max_new_tokens`` after input_ids (1, T) with ``target``, ``k`` draft proposals a round.

    Greedy (``do_sample=False``): token-identical to ``generate(target, ...)``. Sampling: each token follows the
    target's filtered distribution (``temperature``, ``top_k``, ``top_p``, ``min_p``; seeded by ``config.seed``).
    Both models must share the vocabulary. ``repetition_penalty``, beams and stop sequences are not supported.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"speculative decoding takes one prompt: input_ids must have shape (1, T), "
                         f"got {tuple(input_ids.shape)}")
    if k < 1:
        raise ValueError(f"k (draft tokens per round) must be >= 1, got {k!r}")
    if config.num_beams != 1 or config.stop_sequences or config.repetition_penalty != 1.0:
        raise ValueError("speculative decoding supports greedy or sampling with temperature/top-k/top-p/min-p only, "
                         f"got num_beams={config.num_beams}, stop_sequences={config.stop_sequences!r}, "
                         f"repetition_penalty={config.repetition_penalty}")
    t, n = input_ids.shape[1], config.max_new_tokens
    max_len = t + n + k
    for name, model in (("target", target), ("draft", draft)):
        if max_len > model.config.n_ctx:
            raise ValueError(f"prompt of {t} tokens + max_new_tokens={n} + k={k} exceeds the {name}'s context "
                             f"length n_ctx={model.config.n_ctx}")
    modes = target.training, draft.training
    target.eval(), draft.eval()
    gen = torch.Generator(device=input_ids.device).manual_seed(config.seed) if config.seed is not None else None
    t_caches, d_caches = allocate_kv_caches(target, 1, max_len), allocate_kv_caches(draft, 1, max_len)
    seq = input_ids[0].tolist()  # prompt + accepted tokens; the target's cache holds all but the last one
    proposed = accepted = target_calls = 0
    if t > 1:
        target(input_ids[:, :-1], kv_caches=t_caches)  # prefill; the last prompt token goes with the first proposals
        target_calls += 1
    try:
        while len(seq) - t < n and not (len(seq) > t and seq[-1] in config.eos_ids):
            rounds = min(k, n - (len(seq) - t) - 1)  # proposals beyond the last needed token would be wasted
            drafts, q = [], []
            for _ in range(rounds):  # the draft first catches up on the tokens it has not seen, then proposes
                pending = drafts[-1:] if drafts else seq[d_caches[0].seq_len:]
                d_logits = draft(torch.tensor([pending], device=input_ids.device), kv_caches=d_caches)[:, -1]  # (1, V)
                if config.do_sample:
                    q.append(_probs(d_logits, input_ids, config)[0])  # (V,)
                    drafts.append(int(torch.multinomial(q[-1], 1, generator=gen)))
                else:
                    drafts.append(int(d_logits.argmax(-1)))
            checked = torch.tensor([seq[-1:] + drafts], device=input_ids.device)  # (1, 1 + k)
            logits = target(checked, kv_caches=t_caches)[0]  # (1 + k, V): after seq, seq + d1, ..., seq + d1..dk
            target_calls += 1
            n_ok, extra = _verify(logits, drafts, q, input_ids, config, gen)
            proposed += len(drafts)
            accepted += n_ok
            for cache in t_caches:  # keep seq + the accepted proposals; `extra` goes in with the next round
                cache.crop(len(seq) + n_ok)
            seq += drafts[:n_ok] + [extra]
            for cache in d_caches:  # the draft's cache: nothing after the first rejected proposal
                cache.crop(min(cache.seq_len, len(seq) - 1))
    finally:
        target.train(modes[0]), draft.train(modes[1])
    tokens = seq[t:]
    if tokens and tokens[-1] in config.eos_ids:
        tokens = tokens[:-1]
    return SpeculativeOutput(tokens=tokens, proposed=proposed, accepted=accepted, target_calls=target_calls)


def _verify(logits: torch.Tensor, drafts: list[int], q: list[torch.Tensor], ids: torch.Tensor,
            config: GenerationConfig, gen: torch.Generator | None) -> tuple[int, int]:
    """How many proposals to keep, and the token that follows them (a correction or the bonus token)."""
    if not config.do_sample:
        choice = logits.argmax(-1).tolist()  # (k + 1,) the target's greedy token after each prefix
        n_ok = 0
        while n_ok < len(drafts) and drafts[n_ok] == choice[n_ok]:
            n_ok += 1
        for token in drafts[:n_ok]:  # an accepted eos ends the sequence there: nothing after it counts
            if token in config.eos_ids:
                return drafts.index(token), token
        return n_ok, choice[n_ok]
    p = _probs(logits, ids, config)  # (k + 1, V)
    for i, token in enumerate(drafts):
        ratio = p[i, token] / q[i][token]
        if float(torch.rand((), generator=gen, device=p.device)) >= float(ratio):  # rejected
            residual = (p[i] - q[i]).clamp(min=0)
            return i, int(torch.multinomial(residual / residual.sum(), 1, generator=gen))
        if token in config.eos_ids:
            return i, token
    return len(drafts), int(torch.multinomial(p[len(drafts)], 1, generator=gen))
