"""Classification metrics equal sklearn.metrics on random inputs and on the edge cases; bootstrap intervals."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from companion.evaluation import accuracy, bootstrap_ci, confusion_matrix, f1_score, precision_recall_f1

# sklearn warns that a one-label confusion matrix may lack rows; that is the case being compared
pytestmark = pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")

AVERAGES = ["micro", "macro", "weighted", None]


def assert_prf_equal(y, p, labels=None, zero_division=0.0):
    for average in AVERAGES:
        ours = precision_recall_f1(y, p, labels=labels, average=average, zero_division=zero_division)
        ref = skm.precision_recall_fscore_support(y, p, labels=labels, average=average,
                                                  zero_division=zero_division)
        for a, b in zip((ours.precision, ours.recall, ours.f1), ref[:3]):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-12, equal_nan=True, err_msg=f"average={average}")


pairs = st.integers(1, 40).flatmap(lambda n: st.tuples(st.lists(st.integers(0, 4), min_size=n, max_size=n),
                                                       st.lists(st.integers(0, 4), min_size=n, max_size=n)))


@settings(max_examples=150, deadline=None)
@given(pairs, st.sampled_from([0.0, 1.0, math.nan]))
def test_equals_sklearn_on_random_labels(pair, zero_division):
    y, p = pair
    assert accuracy(y, p) == skm.accuracy_score(y, p)
    np.testing.assert_array_equal(confusion_matrix(y, p), skm.confusion_matrix(y, p))
    assert_prf_equal(y, p, zero_division=zero_division)
    assert_prf_equal(y, p, labels=[0, 1, 2, 3, 4, 5], zero_division=zero_division)  # 5 never occurs


def test_edge_cases_equal_sklearn():
    # one class only; a class that is only predicted; a listed class that never occurs; all wrong
    cases = [([1, 1, 1], [1, 1, 1], None), ([0, 0, 0], [0, 1, 0], None), ([0, 1, 1], [0, 1, 1], [0, 1, 2]),
             ([0, 0, 1, 1], [1, 1, 0, 0], None), (["a", "b"], ["b", "b"], None)]
    for y, p, labels in cases:
        for zd in (0.0, 1.0, math.nan):
            assert_prf_equal(y, p, labels=labels, zero_division=zd)
    # by hand: label 2 is listed but absent from both: P = R = F1 = zero_division for it
    per = precision_recall_f1([0, 1, 1], [0, 1, 0], labels=[0, 1, 2], average=None, zero_division=1.0)
    np.testing.assert_allclose(per.precision, [0.5, 1.0, 1.0])
    np.testing.assert_allclose(per.recall, [1.0, 0.5, 1.0])
    np.testing.assert_allclose(per.f1, [2 / 3, 2 / 3, 1.0])
    np.testing.assert_array_equal(per.support, [1, 2, 0])
    assert f1_score([0, 1, 1], [0, 1, 0]) == pytest.approx(2 / 3)


def test_micro_equals_accuracy_when_all_labels_listed():
    rng = np.random.default_rng(0)
    y, p = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    prf = precision_recall_f1(y, p, average="micro")
    assert prf.precision == prf.recall == pytest.approx(prf.f1) == pytest.approx(accuracy(y, p))


def test_bad_input_names_the_values():
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        accuracy([0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="empty"):
        f1_score([], [])
    with pytest.raises(ValueError, match=r"values \[7\] are not in the label set \[0, 1\]"):
        precision_recall_f1([0, 1, 7], [0, 1, 1], labels=[0, 1])
    with pytest.raises(ValueError, match="average must be one of"):
        precision_recall_f1([0], [0], average="binary")
    with pytest.raises(ValueError, match="zero_division must be"):
        precision_recall_f1([0], [0], zero_division="warn")


def test_bootstrap_covers_the_estimate_and_shrinks_with_n():
    rng = np.random.default_rng(1)
    widths = []
    for n in (50, 200, 800, 3200):
        y = rng.integers(0, 2, n)
        p = np.where(rng.random(n) < 0.8, y, 1 - y)  # 80 % correct
        ci = bootstrap_ci(lambda a, b: f1_score(a, b), y, p, n_resamples=300, seed=0)
        assert ci.low <= ci.estimate <= ci.high
        assert ci.estimate == f1_score(y, p)
        widths.append(ci.width)
    assert all(a > b for a, b in zip(widths, widths[1:])), widths
    assert widths[0] / widths[-1] > 4  # about sqrt(3200 / 50) = 8
    # seeded: the same interval twice; another seed another one
    a = bootstrap_ci(accuracy, y, p, n_resamples=200, seed=3)
    assert a == bootstrap_ci(accuracy, y, p, n_resamples=200, seed=3)
    assert a != bootstrap_ci(accuracy, y, p, n_resamples=200, seed=4)


def test_bootstrap_percentiles_by_hand():
    # the metric is the mean; the resample means of a seeded generator are reproduced here directly
    x = np.arange(10.0)
    ci = bootstrap_ci(np.mean, x, n_resamples=500, confidence=0.9, seed=7)
    idx = np.random.default_rng(7).integers(0, 10, size=(500, 10))
    means = x[idx].mean(axis=1)
    assert (ci.low, ci.high) == tuple(np.quantile(means, [0.05, 0.95]))


def test_bootstrap_bad_input():
    with pytest.raises(ValueError, match=r"same length, got lengths \[3, 2\]"):
        bootstrap_ci(accuracy, [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="confidence must be in"):
        bootstrap_ci(np.mean, [1.0], confidence=1.5)
    with pytest.raises(ValueError, match="empty"):
        bootstrap_ci(np.mean, [])
