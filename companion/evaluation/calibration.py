"""Calibration of predicted probabilities (Guo et al., 2017, "On Calibration of Modern Neural Networks").

* Expected calibration error: the top-label confidences are put into ``n_bins`` bins, and
  ECE = sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)|. The binning is a choice that changes the number:
  "equal_width" bins [0, 1/M], (1/M, 2/M], ... (Guo et al.'s, empty bins contribute 0), "equal_mass" bins of
  N/M examples each after sorting by confidence (``numpy.array_split``, sizes differ by at most one).
* Reliability diagram: accuracy against confidence per bin, with the diagonal of perfect calibration.
* Temperature scaling: one scalar T > 0 divides the logits; T is fitted on *validation* data by minimising the
  negative log-likelihood (L-BFGS on log T, float64), and it never changes the argmax, so accuracy is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BINNINGS = ("equal_width", "equal_mass")


def _check_probs(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = np.asarray(probs, dtype=np.float64), np.asarray(labels)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise ValueError(f"probs must have shape (N, K) with K >= 2, got {probs.shape}")
    if len(probs) != len(labels):
        raise ValueError(f"probs and labels must have the same length, got {len(probs)} and {len(labels)}")
    if len(probs) == 0:
        raise ValueError("probs and labels are empty")
    if not np.isfinite(probs).all():
        raise ValueError(f"probs contain {int((~np.isfinite(probs)).sum())} NaN or infinite values")
    if (probs < 0).any() or not np.allclose(probs.sum(axis=1), 1.0, atol=1e-6):
        raise ValueError("each row of probs must be a probability distribution (>= 0, summing to 1)")
    outside = sorted(set(labels.tolist()) - set(range(probs.shape[1])))
    if outside:
        raise ValueError(f"labels {outside[:10]!r} are outside 0..{probs.shape[1] - 1}")
    return probs, labels


@dataclass(frozen=True)
class CalibrationBins:
    counts: np.ndarray  # (M,): examples per bin
    confidence: np.ndarray  # (M,): mean top-label confidence per bin (NaN for an empty bin)
    accuracy: np.ndarray  # (M,): share correct per bin (NaN for an empty bin)
    edges: np.ndarray  # (M + 1,): bin edges (equal_mass: the confidences at the split points)

    @property
    def ece(self) -> float:
        keep = self.counts > 0
        w = self.counts[keep] / self.counts.sum()
        return float(np.sum(w * np.abs(self.accuracy[keep] - self.confidence[keep])))


def calibration_bins(probs, labels, n_bins: int = 15, binning: str = "equal_width") -> CalibrationBins:
    """Bin the top-label confidence ``probs.max(1)`` of (N, K) ``probs`` against ``labels`` (N,)."""
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins!r}")
    probs, labels = _check_probs(probs, labels)
    conf = probs.max(axis=1)  # (N,)
    correct = (probs.argmax(axis=1) == labels).astype(float)  # (N,)
    if binning == "equal_width":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        which = np.clip(np.ceil(conf * n_bins).astype(int) - 1, 0, n_bins - 1)  # (N,): bin (i/M, (i+1)/M]
        groups = [np.flatnonzero(which == b) for b in range(n_bins)]
    else:
        order = np.argsort(conf, kind="stable")
        groups = np.array_split(order, n_bins)
        edges = np.array([0.0] + [float(conf[g[-1]]) if len(g) else math.nan for g in groups])
    counts = np.array([len(g) for g in groups])
    mean = lambda x, g: float(x[g].mean()) if len(g) else math.nan  # noqa: E731
    return CalibrationBins(counts, np.array([mean(conf, g) for g in groups]),
                           np.array([mean(correct, g) for g in groups]), edges)


def expected_calibration_error(probs, labels, n_bins: int = 15, binning: str = "equal_width") -> float:
    """ECE of (N, K) ``probs`` against ``labels``, with the binning stated (see the module docstring)."""
    return calibration_bins(probs, labels, n_bins, binning).ece


def reliability_diagram(probs, labels, n_bins: int = 10, binning: str = "equal_width", ax=None, label: str = ""):
    """Accuracy against confidence per bin (points sized by count) and the diagonal; returns the figure."""
    import matplotlib.pyplot as plt

    bins = calibration_bins(probs, labels, n_bins, binning)
    if ax is None:
        _, ax = plt.subplots(figsize=(3.6, 3.4), dpi=100)
    keep = bins.counts > 0
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="完美校准")
    ax.plot(bins.confidence[keep], bins.accuracy[keep], marker="o", linewidth=1.2,
            label=f"{label} ECE={bins.ece:.3f}".strip())
    ax.set_xlabel("置信度")
    ax.set_ylabel("准确率")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="upper left")
    return ax.figure


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / temperature) over the last axis, in float64."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def fit_temperature(logits, labels, max_iter: int = 100) -> float:
    """The temperature T minimising the mean NLL of softmax(logits / T) on (N, K) ``logits`` and ``labels``:
    L-BFGS (strong Wolfe line search) on log T, from T = 1, in float64. Fit it on validation data only."""
    logits_np = np.asarray(logits, dtype=np.float64)
    if logits_np.ndim != 2 or len(logits_np) != len(labels):
        raise ValueError(f"logits must be (N, K) with N = len(labels), got shape {logits_np.shape} and "
                         f"{len(labels)} labels")
    if not np.isfinite(logits_np).all():
        raise ValueError(f"logits contain {int((~np.isfinite(logits_np)).sum())} NaN or infinite values")
    z = torch.from_numpy(logits_np)  # (N, K)
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)  # (N,)
    if len(y) == 0 or int(y.min()) < 0 or int(y.max()) >= z.shape[1]:
        raise ValueError(f"labels must be in 0..{z.shape[1] - 1} and non-empty")
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def nll(probs, labels) -> float:
    """Mean negative log-likelihood of ``labels`` under (N, K) ``probs``."""
    probs, labels = _check_probs(probs, labels)
    return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-300, None))))
