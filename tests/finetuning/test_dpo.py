import copy
import math

import pytest
import torch

from companion.finetuning.dpo import (DPOConfig, collate_pairs, dpo_loss, evaluate_pairs, pair_logprobs,
                                      sequence_logprobs, train_dpo, trl_dpo_loss)
from companion.finetuning.sft import sft_example
from companion.models import GPT, GPTConfig
from companion.objectives import IGNORE_INDEX


def toy():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=12, n_ctx=16, n_layers=1, d_model=16, n_heads=2)).eval()
    # prompt [1, 3, 4, 2] then the response; 2 is the assistant marker, 0 padding, 11 the end
    chosen = [sft_example([1, 3, 4, 2, 5, 6, 7, 11], [2], [11]), sft_example([1, 3, 2, 5, 5, 11], [2], [11])]
    rejected = [sft_example([1, 3, 4, 2, 8, 9, 11], [2], [11]), sft_example([1, 3, 2, 9, 9, 9, 11], [2], [11])]
    return model, chosen, rejected


def test_sequence_logprobs_sum_only_response_tokens():
    model, chosen, rejected = toy()
    batch = collate_pairs(chosen, rejected, pad_id=0)
    got = sequence_logprobs(model, batch["input_ids"], batch["labels"])  # (4,)
    logp = torch.log_softmax(model(batch["input_ids"]).double(), -1)
    for b in range(4):
        ids, labels = batch["input_ids"][b], batch["labels"][b]
        want = sum(logp[b, t - 1, ids[t]] for t in range(1, ids.shape[0]) if labels[t] != IGNORE_INDEX)
        torch.testing.assert_close(got[b].double(), want, atol=1e-5, rtol=1e-5)
    assert int((batch["labels"][0] != IGNORE_INDEX).sum()) == 4  # 5 6 7 and the end token


def test_step_zero_loss_is_ln2_when_policy_equals_reference():
    model, chosen, rejected = toy()
    batch = collate_pairs(chosen, rejected, pad_id=0)
    pc, pr = pair_logprobs(model, batch)
    rc, rr = pair_logprobs(copy.deepcopy(model), batch)
    out = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert out.margins.abs().max() < 1e-6 and out.accuracy == 0.0  # ties are not counted as correct


def test_loss_equals_formula_and_trl_in_float64():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-10 * torch.rand(6, generator=g, dtype=torch.float64) for _ in range(4))
    beta = 0.25
    out = dpo_loss(pc, pr, rc, rr, beta)
    z = beta * ((pc - rc) - (pr - rr))
    want = torch.log1p(torch.exp(-z)).mean()  # -log sigmoid(z)
    torch.testing.assert_close(out.loss, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(out.chosen_rewards, beta * (pc - rc))
    assert out.accuracy == float(((pc - rc) > (pr - rr)).double().mean())
    torch.testing.assert_close(trl_dpo_loss(pc, pr, rc, rr, beta), out.loss, atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(pc, pr, rc, rr, beta=0)
    with pytest.raises(ValueError, match="same length"):
        dpo_loss(pc, pr[:3], rc, rr)


def test_one_sgd_step_raises_the_chosen_logprob_relative_to_rejected():
    model, chosen, rejected = toy()
    ref = copy.deepcopy(model)
    batch = collate_pairs(chosen, rejected, pad_id=0)
    with torch.no_grad():
        rc, rr = pair_logprobs(ref, batch)
    pc, pr = pair_logprobs(model, batch)
    dpo_loss(pc, pr, rc, rr, beta=0.1).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
        pc2, pr2 = pair_logprobs(model, batch)
    assert bool(((pc2 - pr2) > (pc - pr)).all())  # each pair's margin grew
    assert bool((pc2 > pc).any())


def test_train_dpo_improves_accuracy_and_evaluates():
    model, chosen, rejected = toy()
    ref = copy.deepcopy(model)
    hist = train_dpo(model, chosen, rejected, 0, DPOConfig(steps=20, batch_size=2, lr=1e-2, beta=0.5))
    assert hist["loss"][0] == pytest.approx(math.log(2), abs=1e-6) and hist["loss"][-1] < 0.3
    ev = evaluate_pairs(model, ref, chosen, rejected, 0, beta=0.5)
    assert ev["accuracy"] == 1.0 and ev["margin"] > 1
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        train_dpo(model, chosen, rejected[:1], 0, DPOConfig())
    with pytest.raises(ValueError, match="beta and lr must be > 0"):
        DPOConfig(beta=-1)


def test_sft_weight_keeps_the_chosen_answers_more_likely():
    runs = {}
    for alpha in (0.0, 1.0):
        model, chosen, rejected = toy()
        ref = copy.deepcopy(model)
        train_dpo(model, chosen, rejected, 0, DPOConfig(steps=10, batch_size=2, lr=1e-2, beta=0.5, sft_weight=alpha))
        runs[alpha] = evaluate_pairs(model, ref, chosen, rejected, 0, beta=0.5)["chosen_logp"]
    assert runs[1.0] > runs[0.0] + 0.1
    with pytest.raises(ValueError, match="sft_weight must be >= 0"):
        DPOConfig(sft_weight=-1)
