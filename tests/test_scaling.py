"""companion.scaling against published figures (Brown et al. 2020, Hoffmann et al. 2022, GPT-2)."""

import math
from dataclasses import replace

import pytest
import torch

from companion.scaling import (
    BYTES_PER_PARAM,
    CHINCHILLA_TOKENS_PER_PARAM,
    ChinchillaLaw,
    chinchilla_optimal,
    flops_per_token,
    training_flops,
    weight_memory_bytes,
)


def test_gpt3_training_compute_matches_paper():
    # Brown et al. 2020, Table D.1: GPT-3 175B, 300B training tokens, total compute 3.14e23 FLOPs.
    # 6 * 175e9 * 300e9 = 3.15e23; the paper's count differs by 0.3% (it uses the exact parameter count).
    assert training_flops(175e9, 300e9) == pytest.approx(6 * 175e9 * 300e9, rel=1e-12)
    assert training_flops(175e9, 300e9) == pytest.approx(3.14e23, rel=0.01)


def test_chinchilla_uses_gopher_budget_and_20_tokens_per_param():
    # Hoffmann et al. 2022: Chinchilla (70B params, 1.4T tokens) was trained with Gopher's budget,
    # 5.76e23 FLOPs. 6 * 70e9 * 1.4e12 = 5.88e23, within 3% (the paper counts FLOPs in more detail).
    assert training_flops(70e9, 1.4e12) == pytest.approx(5.76e23, rel=0.03)
    assert 1.4e12 / 70e9 == pytest.approx(CHINCHILLA_TOKENS_PER_PARAM)


@pytest.mark.parametrize(
    # Hoffmann et al. 2022, Table 3 (Approach 1): parameters, FLOPs, tokens.
    "n_params, compute, n_tokens",
    [(400e6, 1.92e19, 8.0e9), (1e9, 1.21e20, 20.2e9), (10e9, 1.23e22, 205.1e9), (67e9, 5.76e23, 1.5e12)],
)
def test_rule_of_thumb_reproduces_table3(n_params, compute, n_tokens):
    # N = sqrt(C / 120), D = 20 N. Table 3's ratios D/N run from 20.0 to 22.4 and its entries are rounded
    # (6 * 67e9 * 1.5e12 = 6.03e23, not 5.76e23); the 67B row is off by 3.4% in N and 7.6% in D, so 8%.
    n, d = chinchilla_optimal(compute)
    assert n == pytest.approx(n_params, rel=0.08)
    assert d == pytest.approx(n_tokens, rel=0.08)
    assert 6 * n * d == pytest.approx(compute, rel=1e-12)  # the split spends exactly the budget


def test_fitted_law_constants_and_exponents():
    law = ChinchillaLaw.hoffmann2022()
    assert (law.E, law.A, law.B, law.alpha, law.beta) == (1.69, 406.4, 410.7, 0.34, 0.28)
    # a = beta / (alpha + beta) = 0.28 / 0.62 = 0.4516; the paper's Table 2 reports a = 0.46, b = 0.54
    # for Approach 3 (from unrounded alpha, beta), so agreement to 0.01.
    a, b = law.exponents
    assert a == pytest.approx(0.46, abs=0.01)
    assert b == pytest.approx(0.54, abs=0.01)
    assert a + b == pytest.approx(1.0)


def test_replication_law_constants_and_tokens_per_parameter():
    # Besiroglu et al. 2024 (arXiv:2404.10102), their refit of Approach 3: E=1.8172, A=482.01, B=2085.43,
    # alpha=0.3478, beta=0.3658. Exponents a = 0.3658 / 0.7136 = 0.5126, b = 0.4874 (close to Approaches 1-2's 0.5).
    law = ChinchillaLaw.besiroglu2024()
    assert (law.E, law.A, law.B, law.alpha, law.beta) == (1.8172, 482.01, 2085.43, 0.3478, 0.3658)
    a, b = law.exponents
    assert a == pytest.approx(0.5126, abs=1e-4) and b == pytest.approx(0.4874, abs=1e-4)
    # The paper's point: the refit's optimum at Chinchilla's budget is ~20 tokens per parameter (Approach 1's rule),
    # while Hoffmann's rounded constants put it at ~90. G = (alpha A / (beta B))**(1/(alpha+beta)), by hand:
    # 0.3478 * 482.01 / (0.3658 * 2085.43) = 167.64 / 762.85 = 0.21976; ** (1 / 0.7136) = exp(ln 0.21976 / 0.7136)
    # = exp(-2.1229) = 0.11968. N_opt = G (C/6)**a with C/6 = 9.6e22.
    c = 5.76e23
    n_opt, d_opt = law.compute_optimal(c)
    g = (0.3478 * 482.01 / (0.3658 * 2085.43)) ** (1 / 0.7136)
    assert g == pytest.approx(0.11968, rel=1e-3)
    assert n_opt == pytest.approx(g * (c / 6) ** (0.3658 / 0.7136), rel=1e-12)
    assert 15 < d_opt / n_opt < 30
    n_h, d_h = ChinchillaLaw.hoffmann2022().compute_optimal(c)
    assert d_h / n_h > 60  # the rounded published constants favour far more data per parameter


def test_fitted_law_loss_by_hand():
    # L(70e9, 1.4e12) = 1.69 + 406.4 / exp(0.34 ln 7e10) + 410.7 / exp(0.28 ln 1.4e12)
    #                 = 1.69 + 406.4 / 4867.9 + 410.7 / 2517.2 = 1.69 + 0.08349 + 0.16316 = 1.93665
    assert ChinchillaLaw.hoffmann2022().loss(70e9, 1.4e12) == pytest.approx(1.93665, abs=2e-4)


def test_compute_optimal_minimises_the_law_on_the_budget():
    law = ChinchillaLaw.hoffmann2022()
    compute = 5.76e23
    n_opt, d_opt = law.compute_optimal(compute)
    assert 6 * n_opt * d_opt == pytest.approx(compute, rel=1e-9)
    # Brute force: scan N on a fine log grid with D = C / (6N); the minimiser must agree.
    grid = torch.logspace(9, 12, 3001, dtype=torch.float64)  # steps of 0.23% in N
    losses = torch.tensor([law.loss(float(n), compute / (6 * float(n))) for n in grid], dtype=torch.float64)
    n_best = float(grid[losses.argmin()])
    assert n_opt == pytest.approx(n_best, rel=0.01)
    assert law.loss(n_opt, d_opt) <= float(losses.min()) + 1e-12


def test_flops_per_token_forward_and_training():
    assert flops_per_token(1e9, training=False) == 2e9
    assert flops_per_token(1e9) == 6e9


def test_flops_per_token_is_one_function_for_counts_and_configs():
    """One definition: ``companion.models.flops_per_token`` is this one; a config adds Kaplan's attention term
    6 * n_layers * n_ctx * d_model (training) to the 6N of its non-embedding parameter count."""
    from companion.models import GPTConfig, count_parameters
    from companion.models import flops_per_token as models_flops_per_token

    assert models_flops_per_token is flops_per_token
    config = GPTConfig.gpt2_small()
    n = count_parameters(config, embeddings=False)
    assert flops_per_token(config, n_ctx=100) - flops_per_token(n) == 6 * 12 * 100 * 768
    assert flops_per_token(config, n_ctx=100, training=False) - flops_per_token(n, training=False) == 2 * 12 * 100 * 768
    with pytest.raises(ValueError, match="n_ctx=1024 needs a model config"):
        flops_per_token(1e9, n_ctx=1024)


def test_weight_memory():
    # GPT-3 175B in bf16: 175e9 * 2 bytes = 350 GB; LLaMA-2 70B in int4: 35 GB.
    assert weight_memory_bytes(175e9, "bf16") == 350e9
    assert weight_memory_bytes(70e9, "int4") == 35e9
    assert weight_memory_bytes(1, "fp32") == 4 * weight_memory_bytes(1, "int8")
    assert set(BYTES_PER_PARAM) == {"fp32", "fp16", "bf16", "fp8", "int8", "int4"}


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, math.nan])
def test_non_positive_inputs_raise(bad):
    with pytest.raises(ValueError, match="n_params must be positive"):
        training_flops(bad, 1e9)
    with pytest.raises(ValueError, match="n_tokens must be positive"):
        training_flops(1e9, bad)
    with pytest.raises(ValueError, match="compute must be positive"):
        chinchilla_optimal(bad)
    with pytest.raises(ValueError, match="compute must be positive"):
        ChinchillaLaw.hoffmann2022().compute_optimal(bad)
    with pytest.raises(ValueError, match="alpha must be positive"):
        ChinchillaLaw(E=1.69, A=406.4, B=410.7, alpha=bad, beta=0.28)


def test_other_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"precision must be one of .* got 'fp64'"):
        weight_memory_bytes(1e9, "fp64")
    with pytest.raises(TypeError, match="n_params must be a number, got '7B'"):
        flops_per_token("7B")
    with pytest.raises(ValueError, match="E must be a non-negative"):
        ChinchillaLaw(E=-1.0, A=1.0, B=1.0, alpha=0.3, beta=0.3)


def test_llm_timeline_is_sourced_and_consistent():
    import csv
    import re
    from pathlib import Path

    from companion.data import data_path

    root = Path(__file__).resolve().parent.parent
    keys = set(re.findall(r"^@\w+\{([^,]+),", (root / "references.bib").read_text(encoding="utf-8"), re.M))
    rows = list(csv.DictReader(data_path("models/llm_timeline.csv").open(encoding="utf-8")))
    assert len(rows) >= 20
    for row in rows:
        assert row["source"] in keys, f"{row['model']}: source {row['source']!r} is not in references.bib"
        assert row["weights"] in {"open", "open-restricted", "on-request", "closed"}
        assert 2017 <= int(row["year"]) <= 2026
    by_name = {row["model"]: row for row in rows}
    gpt3 = by_name["GPT-3"]
    assert training_flops(float(gpt3["parameters"]), float(gpt3["training_tokens"])) == pytest.approx(3.14e23, rel=0.01)
    assert float(by_name["Chinchilla"]["training_tokens"]) / float(by_name["Chinchilla"]["parameters"]) == 20.0
    assert by_name["GPT-4"]["parameters"] == by_name["GPT-4"]["training_tokens"] == ""  # undisclosed: blank
    for row in rows:
        assert row["data"] in {"open", "partial", "closed"}, row["model"]
        if row["data"] == "open":  # open data without open weights would make no "fully open" model
            assert row["weights"] == "open", row["model"]
        if row["active_parameters"]:  # only mixture-of-experts rows, each with fewer active than total parameters
            assert row["architecture"] == "decoder-moe", row["model"]
            assert float(row["active_parameters"]) < float(row["parameters"]), row["model"]
    assert by_name["OLMo-2-13B"]["data"] == "open"  # weights, code and training data released
    # Grattafiori et al. 2024: Llama 3.1 405B, 15.6T tokens, 3.8e25 FLOPs reported; 6ND = 3.79e25 (0.3% below)
    llama = by_name["Llama-3.1-405B"]
    assert training_flops(float(llama["parameters"]), float(llama["training_tokens"])) == pytest.approx(3.8e25, rel=0.01)


def test_flops_per_token_options_add_the_head_and_the_full_attention_term():
    from companion.models import GPTConfig, LlamaConfig

    for config in (GPTConfig.gpt2_small(), LlamaConfig.tiny()):
        v, c, layers, t = config.vocab_size, config.d_model, config.n_layers, config.n_ctx
        base = flops_per_token(config)
        assert flops_per_token(config, head=True) - base == 6 * v * c  # (C) @ (C, V): forward 2VC, training 6VC
        assert flops_per_token(config, full_attention=True) - base == 6 * layers * t * c  # twice Kaplan's term
        assert flops_per_token(config, training=False, head=True, full_attention=True) == (
            flops_per_token(config, training=False) + 2 * v * c + 2 * layers * t * c)
    with pytest.raises(ValueError, match="head=True, full_attention=False need a model config"):
        flops_per_token(1e9, head=True)
    with pytest.raises(ValueError, match="full_attention=True need a model config"):
        flops_per_token(1e9, full_attention=True)


def _counted(model: torch.nn.Module, idx: torch.Tensor, backward: bool) -> int:
    """Matmul FLOPs (2 m n k each) that FlopCounterMode sees in one forward (+ backward) pass."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        logits = model(idx)  # (B, T, V)
        if backward:
            logits.sum().backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_flops_per_token_agrees_with_flop_counter_mode(family):
    """A real forward + backward of a tiny GPT (tied head, biases, LayerNorm) and a tiny Llama (GQA with 2 of 4
    key/value heads, SwiGLU, RMSNorm, untied head).

    FlopCounterMode counts matmuls only, over every query against every key (it ignores causal masking), so it is
    the formula with ``head=True, full_attention=True`` minus N's 1-D parameters (biases, norm gains: 2 FLOPs per
    token each forward, 6 in training, in Kaplan's 2N), exactly. The math attention backend is used because the
    CPU SDPA kernel (aten._scaled_dot_product_flash_attention_for_cpu) has no FlopCounterMode formula in
    torch 2.x: with it the attention term would read 0 (the CUDA flash/efficient kernels are counted).
    """
    from companion.models import GPT, GPTConfig, Llama, LlamaConfig

    config, cls = (GPTConfig.tiny(), GPT) if family == "gpt" else (LlamaConfig.tiny(), Llama)
    config = replace(config, backend="math")
    torch.manual_seed(0)
    model = cls(config)
    b, t = 2, config.n_ctx
    idx = torch.randint(config.vocab_size, (b, t))  # (B, T)
    one_d = sum(p.numel() for p in model.parameters() if p.dim() == 1)  # biases and norm weights
    for training in (False, True):
        counted = _counted(model, idx, backward=training) / (b * t)
        formula = flops_per_token(config, training=training, head=True, full_attention=True)
        assert formula - counted == (6 if training else 2) * one_d  # exact: integers well below 2**53
        # The formula alone is within 2% (GPT: 1.4%, from 13 C biases/gains per layer against 12 C**2 weights;
        # Llama: 0.3%); Kaplan's defaults (no head, half the attention) miss by far more at this tiny width.
        assert formula == pytest.approx(counted, rel=0.02)
        assert flops_per_token(config, training=training) < 0.9 * counted
    model.zero_grad()
    # the Kaplan default and the full count differ by exactly the head and the other half of the attention
    v, c, layers = config.vocab_size, config.d_model, config.n_layers
    assert _counted(model, idx, backward=True) / (b * t) == (
        flops_per_token(config) + 6 * v * c + 6 * layers * t * c - 6 * one_d)
