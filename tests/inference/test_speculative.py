"""Speculative decoding: greedy output identical to the target's greedy decoding for any draft (a good one, a bad
one, the target itself), any k and several prompts; acceptance statistics that add up; the sampling version's
first-token distribution equal to the target's; errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from companion.inference import GenerationConfig, generate
from companion.inference.speculative import speculative_generate
from companion.models import GPT, GPTConfig, Llama, LlamaConfig

CFG = replace(GPTConfig.tiny(), vocab_size=50)


def _gpt(seed: int, scale: float = 6.0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(CFG)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale) if p.dim() > 1 else None
    return model.eval().double()


@pytest.fixture(scope="module")
def target() -> GPT:
    return _gpt(0)


def _truncated(model: GPT) -> GPT:
    """A self-draft: the target's first block only (shares its embeddings and head)."""
    draft = GPT(replace(CFG, n_layers=1)).double()
    draft.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("blocks.1.")})
    return draft.eval()


PROMPTS = [torch.tensor([[5, 9, 2]]), torch.tensor([[7]]), torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])]


@pytest.mark.parametrize(("draft_kind", "k"), [(kind, k) for kind in ("self", "truncated") for k in (1, 3, 6)]
                         + [("random", 1), ("random", 6)])  # a random draft is rejected almost always: k = 3 adds nothing
def test_greedy_equals_target_greedy(target, draft_kind, k):
    draft = {"self": lambda: target, "truncated": lambda: _truncated(target), "random": lambda: _gpt(1)}[draft_kind]()
    for prompt in PROMPTS:
        config = GenerationConfig(max_new_tokens=25)
        out = speculative_generate(target, draft, prompt, config, k=k)
        assert out.tokens == generate(target, prompt, config=config).new_tokens[0]
        assert 0 <= out.accepted <= out.proposed and len(out.tokens) == 25
        if draft_kind == "self":  # the target agrees with itself: every proposal is kept, k + 1 tokens a call
            assert out.acceptance_rate == 1.0
            rounds = out.target_calls - (prompt.shape[1] > 1)
            assert rounds == -(-25 // (k + 1))


def test_bad_draft_is_mostly_rejected_and_good_draft_saves_calls(target):
    prompt = PROMPTS[0]
    config = GenerationConfig(max_new_tokens=30)
    bad = speculative_generate(target, _gpt(1), prompt, config, k=4)
    good = speculative_generate(target, target, prompt, config, k=4)
    assert bad.acceptance_rate < 0.5 < good.acceptance_rate
    assert good.target_calls < bad.target_calls <= 30 + 1  # at worst one token per call, as without a draft


def test_greedy_stops_at_eos(target):
    prompt = PROMPTS[0]
    free = generate(target, prompt, config=GenerationConfig(max_new_tokens=20)).new_tokens[0]
    eos = free[6]
    config = GenerationConfig(max_new_tokens=20, eos_token_id=eos)
    for draft in (target, _gpt(1)):
        out = speculative_generate(target, draft, prompt, config, k=3)
        assert out.tokens == generate(target, prompt, config=config).new_tokens[0] == free[:free.index(eos)]


def test_sampling_first_token_follows_the_target():
    """With a draft that disagrees with the target, the rejection rule still gives the target's distribution."""
    torch.manual_seed(0)
    target_logits, draft_logits = torch.randn(8) * 1.5, torch.randn(8) * 1.5

    class Fixed(torch.nn.Module):  # next-token logits independent of the context
        def __init__(self, logits):
            super().__init__()
            self.logits, self.config = logits, GPTConfig(vocab_size=8, n_ctx=16, n_layers=1, d_model=8, n_heads=1)
            self.blocks = GPT(self.config).blocks

        def forward(self, ids, attention_mask=None, kv_caches=None):
            for cache in kv_caches or []:  # keep the caches' lengths honest
                cache.update(*(torch.zeros(1, 1, ids.shape[1], 8),) * 2)
            return self.logits.expand(1, ids.shape[1], 8)

    target, draft = Fixed(target_logits), Fixed(draft_logits)
    counts = torch.zeros(8)
    n = 1000
    for seed in range(n):
        config = GenerationConfig(max_new_tokens=3, do_sample=True, temperature=0.9, seed=seed)
        out = speculative_generate(target, draft, torch.tensor([[0]]), config, k=2)
        counts[out.tokens[1]] += 1  # position 2: after one accepted-or-corrected draft token
    expected = (target_logits / 0.9).softmax(-1)
    assert float((counts / n - expected).abs().max()) < 0.05  # 1000 draws: standard error <= 0.0159
    draft_only = (draft_logits / 0.9).softmax(-1)
    assert float((draft_only - expected).abs().max()) > 0.1  # the draft alone would fail this test


def test_errors(target):
    with pytest.raises(ValueError, match=r"input_ids must have shape \(1, T\), got \(2, 3\)"):
        speculative_generate(target, target, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="k .* must be >= 1, got 0"):
        speculative_generate(target, target, PROMPTS[0], k=0)
    with pytest.raises(ValueError, match="exceeds the target's context length n_ctx=64"):
        speculative_generate(target, target, PROMPTS[0], GenerationConfig(max_new_tokens=60), k=4)
    with pytest.raises(ValueError, match="repetition_penalty=1.5"):
        speculative_generate(target, target, PROMPTS[0], GenerationConfig(repetition_penalty=1.5))
    llama = Llama(replace(LlamaConfig.tiny(), n_ctx=16)).eval()
    with pytest.raises(ValueError, match="exceeds the draft's context length n_ctx=16"):
        speculative_generate(target, llama, PROMPTS[0], GenerationConfig(max_new_tokens=10), k=4)
