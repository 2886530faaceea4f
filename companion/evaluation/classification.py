"""Classification metrics: accuracy, precision, recall, F1 (per class, micro, macro, weighted) and the confusion
matrix, with the definitions and edge cases of ``sklearn.metrics.precision_recall_fscore_support`` (scikit-learn
1.3+): precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 TP / (2 TP + FP + FN) (computed from the counts,
not from the rounded P and R); a 0/0 gives ``zero_division`` (0.0, 1.0 or NaN, and NaN values are left out of the
macro/weighted means, as scikit-learn does). Micro averaging pools the counts of the listed labels; macro takes the
unweighted mean over labels; weighted weights each label by its support (true count).

Unlike scikit-learn, a label outside an explicitly given label set is an error, not silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

AVERAGES = ("micro", "macro", "weighted", None)


def _check_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if y_true.ndim != 1 or y_pred.ndim != 1:
        raise ValueError(f"y_true and y_pred must be 1-D, got shapes {y_true.shape} and {y_pred.shape}")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred must have the same length, got {len(y_true)} and {len(y_pred)}")
    if len(y_true) == 0:
        raise ValueError("y_true and y_pred are empty: a metric needs at least one example")
    return y_true, y_pred


def _labels(y_true: np.ndarray, y_pred: np.ndarray, labels: Sequence | None) -> np.ndarray:
    if labels is None:
        return np.unique(np.concatenate([y_true, y_pred]))
    labels = np.asarray(labels)
    if len(labels) == 0 or len(np.unique(labels)) != len(labels):
        raise ValueError(f"labels must be non-empty and distinct, got {labels.tolist()!r}")
    outside = sorted(set(np.concatenate([y_true, y_pred]).tolist()) - set(labels.tolist()))
    if outside:
        raise ValueError(f"values {outside[:10]!r} are not in the label set {labels.tolist()!r}")
    return labels


def confusion_matrix(y_true, y_pred, labels: Sequence | None = None) -> np.ndarray:
    """(K, K) counts: row i = true label ``labels[i]``, column j = predicted label ``labels[j]`` (labels default
    to the sorted union of both arrays), as ``sklearn.metrics.confusion_matrix``."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    labels = _labels(y_true, y_pred, labels)
    index = {v: i for i, v in enumerate(labels.tolist())}
    K = len(labels)
    flat = np.array([index[t] * K + index[p] for t, p in zip(y_true.tolist(), y_pred.tolist())])  # (N,)
    return np.bincount(flat, minlength=K * K).reshape(K, K)  # (K, K)


def accuracy(y_true, y_pred) -> float:
    """Share of examples whose prediction equals the label."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    return float(np.mean(y_true == y_pred))


def _divide(num: np.ndarray, den: np.ndarray, zero_division: float) -> np.ndarray:
    out = np.full(num.shape, float(zero_division))
    np.divide(num, den, out=out, where=den > 0)
    return out


def _mean(values: np.ndarray, weights: np.ndarray | None) -> float:
    keep = ~np.isnan(values)
    if not keep.any():
        return math.nan
    if weights is None or weights[keep].sum() == 0:  # all weights zero: scikit-learn falls back to the plain mean
        return float(values[keep].mean())
    return float(np.average(values[keep], weights=weights[keep]))


@dataclass(frozen=True)
class PRF:
    precision: float | np.ndarray  # a float when averaged, else (K,) per label
    recall: float | np.ndarray  # idem
    f1: float | np.ndarray  # idem
    support: np.ndarray  # (K,): true count of each label
    labels: np.ndarray  # (K,): the labels, in the order of the per-label arrays


def precision_recall_f1(y_true, y_pred, labels: Sequence | None = None, average: str | None = "macro",
                        zero_division: float = 0.0) -> PRF:
    """Precision, recall and F1 over ``labels`` (default: the sorted union of both arrays), averaged by
    ``average`` ("micro", "macro", "weighted", or None for per-label arrays)."""
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    if not (zero_division in (0, 1) or (isinstance(zero_division, float) and math.isnan(zero_division))):
        raise ValueError(f"zero_division must be 0.0, 1.0 or nan, got {zero_division!r}")
    cm = confusion_matrix(y_true, y_pred, labels)  # (K, K)
    labels = _labels(*_check_pair(y_true, y_pred), labels)
    tp = np.diag(cm).astype(float)  # (K,)
    pred = cm.sum(axis=0).astype(float)  # (K,): TP + FP
    true = cm.sum(axis=1).astype(float)  # (K,): TP + FN, the support
    if average == "micro":
        tp, pred, true_used = tp.sum(keepdims=True), pred.sum(keepdims=True), true.sum(keepdims=True)
    else:
        true_used = true
    p = _divide(tp, pred, zero_division)
    r = _divide(tp, true_used, zero_division)
    f = _divide(2 * tp, pred + true_used, zero_division)
    support = true.astype(int)
    if average is None:
        return PRF(p, r, f, support, labels)
    weights = true if average == "weighted" else None
    return PRF(_mean(p, weights), _mean(r, weights), _mean(f, weights), support, labels)


def f1_score(y_true, y_pred, labels: Sequence | None = None, average: str | None = "macro",
             zero_division: float = 0.0) -> float | np.ndarray:
    """F1 alone (see :func:`precision_recall_f1`); ``macro_f1 = f1_score(y, p)``."""
    return precision_recall_f1(y_true, y_pred, labels, average, zero_division).f1
