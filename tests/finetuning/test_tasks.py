import random

import pytest

from companion.data import tang_poem_splits
from companion.finetuning.tasks import (FORM_PROMPTS, break_form, follows_form, form_tasks, preference_pairs)
from companion.poem_eval import poem_clauses


@pytest.fixture(scope="module")
def validation():
    return tang_poem_splits()["validation"]


def test_follows_form_on_hand_examples():
    assert follows_form("白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。", 5)
    assert not follows_form("白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。", 7)
    assert not follows_form("白日依山尽，黄河入海流。\n欲穷千里目，更上层楼。", 5)  # one clause of 4
    assert not follows_form("白日依山尽，黄河入海流。\n欲穷千里目，更上一层楼。\n白日依山尽，黄河入海流。", 5)  # 6 clauses
    with pytest.raises(ValueError, match="form must be one of"):
        follows_form("白日依山尽", 6)


def test_form_tasks_match_metadata_and_form(validation):
    tasks = form_tasks(validation)
    forms = dict(zip(validation["id"], validation["form"]))
    n_quatrains = sum(f in ("五言绝句", "七言绝句") for f in validation["form"])
    assert len(tasks) == n_quatrains  # every quatrain of the split passes the check
    for t in tasks:
        assert follows_form(t.response, t.form) and t.prompt == FORM_PROMPTS[t.form]
        assert forms[t.poem_id] == ("五言绝句" if t.form == 5 else "七言绝句")
        assert len(t.response) <= 35  # fits tang_gpt's context with the template
    balanced = form_tasks(validation, per_form=50, seed=1)
    assert sorted(t.form for t in balanced) == [5] * 50 + [7] * 50
    assert [t.poem_id for t in balanced] == [t.poem_id for t in form_tasks(validation, per_form=50, seed=1)]


def test_form_tasks_errors(validation):
    with pytest.raises(ValueError, match="forms must be"):
        form_tasks(validation, forms=(6,))
    with pytest.raises(ValueError, match="per_form"):
        form_tasks(validation, per_form=0)
    with pytest.raises(ValueError, match="no 五言绝句"):
        form_tasks([{"id": "x", "form": "其他", "text": "白日依山尽"}], forms=(5,))


def test_break_form_never_passes_and_uses_all_three_ways(validation):
    rng = random.Random(0)
    kinds = set()
    for t in form_tasks(validation):
        broken = break_form(t.response, rng)
        assert not follows_form(broken, t.form), broken
        n_chars = len("".join(poem_clauses(broken)))
        kinds.add(("fewer clauses" if len(poem_clauses(broken)) == 3 else
                   "one more" if n_chars == 4 * t.form + 1 else "one fewer" if n_chars == 4 * t.form - 1 else "?"))
    assert kinds == {"fewer clauses", "one more", "one fewer"}
    with pytest.raises(ValueError, match="at least two clauses"):
        break_form("白日依山尽", rng)


def test_preference_pairs(validation):
    tasks = form_tasks(validation, per_form=20)
    pairs = preference_pairs(tasks, seed=0)
    assert len(pairs) == len(tasks)
    for p, t in zip(pairs, tasks):
        assert p.chosen == t.response and follows_form(p.chosen, p.form) and not follows_form(p.rejected, p.form)
    assert pairs == preference_pairs(tasks, seed=0)


@pytest.mark.parametrize("k, n", [(0, 10), (3, 10), (163, 200), (200, 200)])
def test_wilson_interval_equals_scipy(k, n):
    from scipy.stats import binomtest

    from companion.finetuning.tasks import wilson_interval

    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-12)


def test_wilson_interval_errors():
    from companion.finetuning.tasks import wilson_interval

    with pytest.raises(ValueError, match="successes=11, n=10"):
        wilson_interval(11, 10)
