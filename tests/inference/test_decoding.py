"""Decoding against transformers: padded forward passes, greedy and beam search token-identical to
``transformers.generate``, each logits filter equal to its transformers LogitsProcessor, seeded sampling, stop
sequences, eos handling and streaming.

Models are tiny, randomly initialised transformers GPT-2 / Llama models (weights drawn from N(0, 0.25^2) so that
logits are far from ties), loaded into ours with `companion.models.from_pretrained`; both run in float64, so argmax
choices agree exactly unless two logits tie within ~1e-12.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tr

from companion.inference import (GenerationConfig, apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p,
                                 generate, process_logits, stream)
from companion.models import from_pretrained

tr.logging.set_verbosity_error()
tr.logging.disable_progress_bar()
V, EOS, PAD = 61, 3, 1  # PAD != 0: transformers fills finished beams with eos when pad_token_id is 0 (falsy)


def _hf(kind: str):
    if kind == "gpt2":
        cfg = tr.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=48, bos_token_id=EOS,
                            eos_token_id=EOS, pad_token_id=PAD)
        model = tr.GPT2LMHeadModel(cfg)
    else:
        cfg = tr.LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=64, vocab_size=V, max_position_embeddings=48, bos_token_id=EOS,
                             eos_token_id=EOS, pad_token_id=PAD)
        model = tr.LlamaForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.25)
    return model.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    theirs = _hf(request.param)
    path = tmp_path_factory.mktemp(request.param)
    theirs.save_pretrained(path)
    ours = from_pretrained(path).eval()
    return theirs.double(), ours.double()


def _left_padded() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, V, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids.masked_fill(mask == 0, PAD), mask


def test_left_padded_rows_match_rows_alone(pair):
    theirs, ours = pair
    ids, mask = _left_padded()
    with torch.no_grad():
        batched = ours(ids, attention_mask=mask)  # (B, T, V)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # what transformers' generate passes
        ref = theirs(ids, attention_mask=mask, position_ids=positions).logits
        for row in range(ids.shape[0]):
            real = mask[row].bool()
            alone = ours(ids[row:row + 1, real])[0]
            torch.testing.assert_close(batched[row, real], alone, atol=1e-10, rtol=0)
            torch.testing.assert_close(batched[row, real], ref[row, real], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours(ids, attention_mask=torch.ones_like(ids)), ours(ids), atol=0, rtol=0)


def test_attention_mask_shape_error(pair):
    _, ours = pair
    ids, mask = _left_padded()
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(B, S\) = \(3, 7\)"):
        ours(ids, attention_mask=mask[:, 1:])


@pytest.mark.parametrize("eos", [None, EOS])
def test_greedy_matches_transformers(pair, eos):
    theirs, ours = pair
    ids, mask = _left_padded()
    config = GenerationConfig(max_new_tokens=12, eos_token_id=eos)
    out = generate(ours, ids, mask, config, pad_token_id=PAD)
    ref = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos,
                          pad_token_id=PAD)
    assert torch.equal(out.sequences, ref)
    uncached = generate(ours, ids, mask, GenerationConfig(max_new_tokens=12, eos_token_id=eos, use_cache=False),
                        pad_token_id=PAD)
    assert torch.equal(uncached.sequences, out.sequences)


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_matches_transformers(pair, num_beams):
    theirs, ours = pair
    ids, mask = _left_padded()
    for eos in (None, EOS):
        config = GenerationConfig(max_new_tokens=10, num_beams=num_beams, eos_token_id=eos)
        out = generate(ours, ids, mask, config, pad_token_id=PAD)
        ref = theirs.generate(ids, attention_mask=mask, max_new_tokens=10, num_beams=num_beams, do_sample=False,
                              eos_token_id=eos, pad_token_id=PAD)
        assert torch.equal(out.sequences, ref), (eos, out.sequences, ref)


def _logits() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(4, V, generator=g) * 3, torch.randint(0, V, (4, 9), generator=g)


@pytest.mark.parametrize("ours, theirs", [
    (lambda x, ids: apply_top_k(x, 5), tr.TopKLogitsWarper(5)),
    (lambda x, ids: apply_top_p(x, 0.8), tr.TopPLogitsWarper(0.8)),
    (lambda x, ids: apply_top_p(x, 0.05), tr.TopPLogitsWarper(0.05)),
    (lambda x, ids: apply_min_p(x, 0.1), tr.MinPLogitsWarper(0.1)),
    (lambda x, ids: apply_repetition_penalty(x, ids, 1.3), tr.RepetitionPenaltyLogitsProcessor(1.3)),
], ids=["top_k", "top_p", "top_p_tiny", "min_p", "repetition"])
def test_filters_equal_transformers_processors(ours, theirs):
    logits, ids = _logits()
    expected = theirs(ids, logits.clone())
    got = ours(logits.clone(), ids)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert bool(torch.isfinite(got).any(dim=-1).all())  # every row keeps at least one token


def test_process_logits_chains_in_transformers_order():
    logits, ids = _logits()
    config = GenerationConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    chain = tr.LogitsProcessorList([tr.RepetitionPenaltyLogitsProcessor(1.2), tr.TemperatureLogitsWarper(0.7),
                                    tr.TopKLogitsWarper(20), tr.TopPLogitsWarper(0.9), tr.MinPLogitsWarper(0.05)])
    torch.testing.assert_close(process_logits(logits.clone(), ids, config), chain(ids, logits.clone()), atol=1e-6, rtol=0)


def test_repetition_penalty_ignores_padding():
    logits, ids = _logits()
    mask = torch.ones_like(ids)
    mask[:, 0] = 0
    got = apply_repetition_penalty(logits, ids, 2.0, mask)
    for row in range(ids.shape[0]):
        token = int(ids[row, 0])
        expected = logits[row, token] / 2 if logits[row, token] > 0 else logits[row, token] * 2
        expected = expected if token in ids[row, 1:].tolist() else logits[row, token]
        assert float(got[row, token]) == pytest.approx(float(expected))


def test_seeded_sampling_is_reproducible(pair):
    _, ours = pair
    ids, mask = _left_padded()
    config = GenerationConfig(max_new_tokens=15, do_sample=True, temperature=1.5, top_k=30, seed=7)
    a = generate(ours, ids, mask, config, pad_token_id=PAD).sequences
    b = generate(ours, ids, mask, config, pad_token_id=PAD).sequences
    c = generate(ours, ids, mask, GenerationConfig(max_new_tokens=15, do_sample=True, temperature=1.5, top_k=30,
                                                   seed=8), pad_token_id=PAD).sequences
    assert torch.equal(a, b) and not torch.equal(a, c)
    greedy = generate(ours, ids, mask, GenerationConfig(max_new_tokens=15), pad_token_id=PAD).sequences
    assert not torch.equal(a, greedy)  # temperature 1.5 over 30 tokens: 45 draws all equal to argmax is ~impossible


def test_sampling_frequencies_follow_the_filtered_softmax():
    """One decoding step many times over: the empirical token frequencies approach softmax(top-k(logits / T))."""
    torch.manual_seed(0)
    logits = torch.randn(V) * 2

    class Fixed(torch.nn.Module):  # a "model" whose next-token logits are always `logits`
        config = type("C", (), {"n_layers": 1, "n_ctx": 8})()

        def forward(self, ids, attention_mask=None, kv_caches=None):
            return logits.expand(ids.shape[0], ids.shape[1], V)

    config = GenerationConfig(max_new_tokens=1, do_sample=True, temperature=0.8, top_k=6, seed=0, use_cache=False)
    ids = torch.zeros(4000, 1, dtype=torch.long)
    drawn = generate(Fixed(), ids, config=config).sequences[:, -1]
    freq = torch.bincount(drawn, minlength=V).double() / len(drawn)
    expected = apply_top_k(logits[None] / 0.8, 6).softmax(-1)[0].double()
    assert float((freq - expected).abs().max()) < 0.03  # 4000 draws: standard error <= 0.008
    assert bool((freq[expected == 0] == 0).all())


def test_eos_and_stop_sequences_end_rows(pair):
    _, ours = pair
    ids, mask = _left_padded()
    free = generate(ours, ids, mask, GenerationConfig(max_new_tokens=10), pad_token_id=PAD)
    assert free.finish_reasons == ["length"] * 3 and all(len(t) == 10 for t in free.new_tokens)
    stop = tuple(free.new_tokens[0][3:5])  # row 0 will produce this pair at new positions 3-4
    eos = free.new_tokens[1][2]  # row 1 will produce this token at new position 2
    config = GenerationConfig(max_new_tokens=10, stop_sequences=(stop,), eos_token_id=eos)
    out = generate(ours, ids, mask, config, pad_token_id=PAD)
    first_eos = free.new_tokens[1].index(eos)
    assert out.new_tokens[1] == free.new_tokens[1][:first_eos] and out.finish_reasons[1] == "stop"
    assert out.new_tokens[0][-len(stop):] != list(stop) and out.finish_reasons[0] == "stop"
    t = ids.shape[1]
    assert out.sequences[1, t + first_eos].item() == eos and bool((out.sequences[1, t + first_eos + 1:] == PAD).all())
    assert torch.equal(out.sequences[:, :t], ids)


def test_stream_yields_what_generate_returns(pair):
    _, ours = pair
    ids = _left_padded()[0][:1]
    free = generate(ours, ids, config=GenerationConfig(max_new_tokens=12)).new_tokens[0]
    for config in (GenerationConfig(max_new_tokens=12),
                   GenerationConfig(max_new_tokens=12, stop_sequences=(tuple(free[5:8]), (free[0], -1))),
                   GenerationConfig(max_new_tokens=12, do_sample=True, seed=3),
                   GenerationConfig(max_new_tokens=12, eos_token_id=free[4])):
        assert list(stream(ours, ids, config)) == generate(ours, ids, config=config).new_tokens[0]
    assert torch.is_grad_enabled()  # streaming does not leave inference mode switched on between tokens


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": -1}, "max_new_tokens must be >= 0, got -1"),
    ({"temperature": 0.0}, "temperature must be > 0"),
    ({"top_k": 0}, "top_k must be a positive int or None, got 0"),
    ({"top_p": 1.5}, r"top_p must be in \(0, 1\] or None, got 1.5"),
    ({"min_p": 0.0}, r"min_p must be in \(0, 1\] or None, got 0.0"),
    ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
    ({"num_beams": 0}, "num_beams must be >= 1, got 0"),
    ({"num_beams": 2, "do_sample": True}, "num_beams=2 needs do_sample=False"),
    ({"stop_sequences": ((),)}, "stop sequences must be non-empty"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GenerationConfig(**kwargs)


def test_input_errors(pair):
    _, ours = pair
    ids, mask = _left_padded()
    with pytest.raises(ValueError, match=r"exceeds the model's context length n_ctx=48"):
        generate(ours, ids, mask, GenerationConfig(max_new_tokens=42))
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(3, 7\)"):
        generate(ours, ids, mask[:2])
    with pytest.raises(ValueError, match=r"input_ids must have shape \(1, T\)"):
        next(stream(ours, ids))
    with pytest.raises(ValueError, match="beam search supports eos_token_id, not stop_sequences"):
        generate(ours, ids, mask, GenerationConfig(max_new_tokens=4, num_beams=2, stop_sequences=((5,),)))
