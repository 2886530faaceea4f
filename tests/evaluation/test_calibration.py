"""ECE with both binnings (by hand and against a direct loop), the reliability diagram, temperature scaling
recovering a known temperature on synthetic logits, bad input."""

import math

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest

from companion.evaluation import (
    bootstrap_ci,
    calibration_bins,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_diagram,
    softmax,
)


def two_class(conf):
    conf = np.asarray(conf, dtype=float)
    return np.stack([conf, 1 - conf], axis=1)  # top label is class 0 when conf >= 0.5


def test_ece_by_hand():
    # 4 examples, confidences 0.6 0.7 0.9 0.95, correct: yes no yes yes
    probs, labels = two_class([0.6, 0.7, 0.9, 0.95]), np.array([0, 1, 0, 0])
    # equal width, 2 bins: (0, .5] empty; (.5, 1]: all 4, accuracy 3/4, confidence 0.7875 -> |0.75 - 0.7875|
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(0.0375)
    # equal mass, 2 bins: {0.6, 0.7} acc 1/2 conf 0.65; {0.9, 0.95} acc 1 conf 0.925 -> (0.15 + 0.075) / 2
    assert expected_calibration_error(probs, labels, n_bins=2, binning="equal_mass") == pytest.approx(0.1125)
    # a confidence exactly on an edge goes to the lower bin (i/M, (i+1)/M]
    bins = calibration_bins(two_class([0.5, 0.75, 1.0]), [0, 0, 0], n_bins=4)
    np.testing.assert_array_equal(bins.counts, [0, 1, 1, 1])


def test_ece_equals_a_direct_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(500, 5)) * 2
    probs, labels = softmax(logits), rng.integers(0, 5, 500)
    conf, correct = probs.max(1), probs.argmax(1) == labels
    for M in (1, 10, 15):
        direct = 0.0
        for b in range(M):
            lo, hi = b / M, (b + 1) / M
            inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
            if inside.any():
                direct += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
        assert expected_calibration_error(probs, labels, M) == pytest.approx(direct, abs=1e-12)
        mass = calibration_bins(probs, labels, M, "equal_mass")
        assert mass.counts.max() - mass.counts.min() <= 1 and mass.counts.sum() == 500


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    true_logits = rng.normal(size=(20000, 4)) * 1.5  # calibrated by construction: labels drawn from softmax
    p = softmax(true_logits)
    labels = (p.cumsum(1) > rng.random((20000, 1))).argmax(1)
    for T in (0.5, 2.5):
        shown = true_logits * T  # an over-confident (T > 1) or under-confident (T < 1) model
        fitted = fit_temperature(shown, labels)
        assert fitted == pytest.approx(T, rel=0.05)
        before, after = softmax(shown), softmax(shown, fitted)
        assert expected_calibration_error(after, labels) < expected_calibration_error(before, labels)
        assert nll(after, labels) < nll(before, labels)
        np.testing.assert_array_equal(before.argmax(1), after.argmax(1))  # accuracy unchanged


def test_reliability_diagram_and_bootstrap():
    rng = np.random.default_rng(2)
    probs, labels = softmax(rng.normal(size=(300, 3)) * 3), rng.integers(0, 3, 300)
    fig = reliability_diagram(probs, labels, n_bins=10, label="随机")
    ax = fig.axes[0]
    bins = calibration_bins(probs, labels, 10)
    x, y = ax.lines[1].get_data()
    np.testing.assert_allclose(x, bins.confidence[bins.counts > 0])
    np.testing.assert_allclose(y, bins.accuracy[bins.counts > 0])
    ci = bootstrap_ci(lambda p, y: expected_calibration_error(p, y, 10), probs, labels, n_resamples=200)
    assert ci.low <= ci.estimate <= ci.high and ci.estimate == bins.ece


def test_bad_input():
    good = two_class([0.6, 0.7])
    with pytest.raises(ValueError, match="same length, got 2 and 3"):
        expected_calibration_error(good, [0, 1, 0])
    with pytest.raises(ValueError, match="2 NaN or infinite values"):
        expected_calibration_error(two_class([0.6, math.nan]), [0, 1])
    with pytest.raises(ValueError, match=r"labels \[2\] are outside 0..1"):
        expected_calibration_error(good, [0, 2])
    with pytest.raises(ValueError, match="binning must be one of"):
        expected_calibration_error(good, [0, 1], binning="quantile")
    with pytest.raises(ValueError, match="probability distribution"):
        expected_calibration_error(np.array([[0.6, 0.6], [0.5, 0.5]]), [0, 1])
    with pytest.raises(ValueError, match="1 NaN or infinite"):
        fit_temperature(np.array([[0.0, math.nan]]), [0])
    with pytest.raises(ValueError, match="empty"):
        expected_calibration_error(np.zeros((0, 2)), [])
