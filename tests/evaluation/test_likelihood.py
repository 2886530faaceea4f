"""Multiple choice by log-likelihood: the package's scores equal log-softmax summed by hand on a tiny GPT; the
normalisations; derived question sets (keys computed, seeded)."""

import numpy as np
import pytest
import torch

from companion.evaluation import (
    MultipleChoice,
    arithmetic_questions,
    continuation_logprobs,
    next_line_questions,
    score_multiple_choice,
)
from companion.models import GPT, GPTConfig

VOCAB = "<>床前明月光疑是地上霜举头望低思故乡，。\n"


def encode(text):
    return [VOCAB.index(c) for c in text]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=len(VOCAB), n_ctx=16, n_layers=2, d_model=32, n_heads=4)).double().eval()


@torch.no_grad()
def by_hand(model, ids, n_cont):
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)  # (T, V)
    return sum(float(logp[t - 1, ids[t]]) for t in range(len(ids) - n_cont, len(ids)))


def test_scores_equal_log_softmax_summed_by_hand(model):
    items = [MultipleChoice("床前明月光，", ("疑是地上霜。", "低头", "举头望明月，低头思故乡。"), 0),
             MultipleChoice("举头", ("望明月", "思故乡"), 1)]
    items = [MultipleChoice(it.question, it.choices[:2], it.answer) for it in items]
    s = score_multiple_choice(model, encode, items, max_length=16, prefix_ids=[0])
    for n, it in enumerate(items):
        for k, c in enumerate(it.choices):
            assert s.logprobs[n, k] == pytest.approx(by_hand(model, [0] + encode(it.question + c), len(c)), rel=1e-12)
    np.testing.assert_array_equal(s.tokens, s.chars)  # a character tokenizer
    np.testing.assert_array_equal(s.bytes, 3 * s.chars)  # every character is Chinese
    np.testing.assert_allclose(s.scores("chars"), s.logprobs / s.chars)
    assert s.chance == 0.5
    assert s.accuracy() == np.mean(s.logprobs.argmax(1) == s.answers)
    np.testing.assert_allclose(s.probabilities().sum(1), 1.0)


def test_long_input_is_cut_on_the_left(model):
    context = encode("床前明月光，疑是地上霜。举头望明月，")
    cont = encode("低头思故乡。")
    (lp,) = continuation_logprobs(model, context, [cont], max_length=10)
    ids = (context + cont)[-11:]
    assert lp == pytest.approx(by_hand(model, ids, len(cont)), rel=1e-12)


def test_length_normalisation_changes_the_choice():
    from companion.evaluation.likelihood import ChoiceScores
    # a short choice with a low per-character score vs a long one with a high per-character score
    s = ChoiceScores(np.array([[-3.0, -5.0]]), np.array([[1, 5]]), np.array([[1, 5]]), np.array([[1, 15]]),
                     np.array([1]))
    assert s.accuracy("none") == 0.0 and s.accuracy("chars") == 1.0 and s.accuracy("tokens") == 1.0
    assert s.accuracy("bytes") == 1.0  # -5/15 > -3/1


def test_derived_question_sets():
    poems = ["床前明月光，疑是地上霜。\n举头望明月，低头思故乡。", "白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。",
             "千山鸟飞绝，万径人踪灭。\n孤舟蓑笠翁，独钓寒江雪。", "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。",
             "红豆生南国，春来发几枝。\n愿君多采撷，此物最相思。"]
    qs = next_line_questions(poems, n_questions=5, n_choices=4, seed=0)
    assert qs == next_line_questions(poems, n_questions=5, n_choices=4, seed=0)
    for q in qs:
        poem = next(p for p in poems if p.startswith(q.question))  # the question is a first line here
        assert q.choices[q.answer] == poem.split("\n")[1]
        assert len(set(q.choices)) == 4 and len({len(c) for c in q.choices}) == 1
        assert sum(c in poem for c in q.choices) == 1  # distractors come from other poems
    for q in next_line_questions(poems, n_questions=5, distractors="shuffled", seed=0):
        true = q.choices[q.answer]
        assert any(f"{q.question}{true}" in p for p in poems) and len(set(q.choices)) == 4
        assert all(sorted(c) == sorted(true) for c in q.choices)  # the same characters in other orders
    for q in arithmetic_questions(20, seed=1):
        a, b = map(int, q.question.removeprefix("Question: What is ").split("?")[0].split(" + "))
        assert q.choices[q.answer] == f" {a + b}" and len(set(q.choices)) == 4
    assert len({q.answer for q in arithmetic_questions(40, seed=1)}) == 4  # the key is not always in one place
    for q in arithmetic_questions(5, low=1, high=9, shots=2, seed=2):  # few-shot: two solved examples first
        solved = q.question.split("\n\n")[:-1]
        assert len(solved) == 2
        for example in solved:
            a, b = map(int, example.split("What is ")[1].split("?")[0].split(" + "))
            assert example.endswith(f"Answer: {a + b}")


def test_bad_input(model):
    with pytest.raises(ValueError, match="answer must index one of the 2 choices, got 2"):
        MultipleChoice("q", ("a", "b"), 2)
    with pytest.raises(ValueError, match="at least 2 choices"):
        MultipleChoice("q", ("a",), 0)
    with pytest.raises(ValueError, match="same number of choices"):
        score_multiple_choice(model, encode, [MultipleChoice("床", ("前", "明"), 0),
                                              MultipleChoice("床", ("前", "明", "月"), 0)], 16, [0])
    with pytest.raises(ValueError, match="no questions"):
        score_multiple_choice(model, encode, [], 16)
    with pytest.raises(ValueError, match="distractors must be one of"):
        next_line_questions(["a\nb"], 1, distractors="random")
    with pytest.raises(ValueError, match="only 0 questions can be built"):
        next_line_questions(["床前明月光，\n疑是地上霜。"], n_questions=1)
