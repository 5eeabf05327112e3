"""Calibration: ECE, MCE, reliability bins (Guo, Pleiss, Sun & Weinberger 2017) and Brier score.

Binning convention (pinned): ``n_bins`` equal-width bins on [0, 1] with edges k / n_bins; bin b
holds confidences in (lower, upper], except that the first bin also holds exactly 0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .spectral import as_numpy

__all__ = [
    "bin_index",
    "brier_score",
    "expected_calibration_error",
    "maximum_calibration_error",
    "reliability_bins",
]


def _check_inputs(confidences: Any, correct: Any, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    conf = as_numpy(confidences)
    corr = as_numpy(correct)
    if conf.ndim != 1 or conf.size < 1:
        raise ValueError(f"confidences must be a non-empty 1-D array, got shape {conf.shape}")
    if corr.shape != conf.shape:
        raise ValueError(f"correct must have shape {conf.shape}, got {corr.shape}")
    if not np.all(np.isfinite(conf)) or np.any(conf < 0.0) or np.any(conf > 1.0):
        raise ValueError("confidences must be finite and within [0, 1]")
    if not np.all((corr == 0.0) | (corr == 1.0)):
        raise ValueError("correct must contain only 0/1 (or booleans)")
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins}")
    return conf, corr


def bin_index(confidences: Any, n_bins: int = 15) -> np.ndarray:
    """The 0-based bin of each confidence under the pinned convention: equal-width bins with
    edges k / n_bins, bin b holding (lower, upper], the first also holding exactly 0."""
    conf = as_numpy(confidences)
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, int(n_bins) - 1)


def _bin_stats(
    confidences: Any, correct: Any, n_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]:
    """Per-bin (edges, count, sum of confidence, sum of correct) and N."""
    conf, corr = _check_inputs(confidences, correct, n_bins)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = bin_index(conf, n_bins)
    count = np.bincount(idx, minlength=n_bins).astype(np.float64)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    corr_sum = np.bincount(idx, weights=corr, minlength=n_bins)
    return edges, count, conf_sum, corr_sum, conf.size


def expected_calibration_error(confidences: Any, correct: Any, n_bins: int = 15) -> float:
    """ECE = Σ_b (n_b / N) · |acc_b − conf_b| over equal-width bins (Guo et al. 2017, eq. 3).

    ``confidences`` (N,) are predicted-class probabilities in [0, 1]; ``correct`` (N,) is 1 when
    the prediction was right. acc_b and conf_b are the mean correctness and confidence of bin b;
    empty bins contribute 0. Bins are (lower, upper], the first also holding 0.
    """
    _, count, conf_sum, corr_sum, n = _bin_stats(confidences, correct, n_bins)
    return float(np.sum(np.abs(corr_sum - conf_sum)) / n)


def maximum_calibration_error(confidences: Any, correct: Any, n_bins: int = 15) -> float:
    """MCE = max over non-empty bins of |acc_b − conf_b| (Guo et al. 2017, eq. 5)."""
    _, count, conf_sum, corr_sum, _ = _bin_stats(confidences, correct, n_bins)
    nz = count > 0
    return float(np.max(np.abs(corr_sum[nz] - conf_sum[nz]) / count[nz]))


def reliability_bins(confidences: Any, correct: Any, n_bins: int = 15) -> list[dict[str, Any]]:
    """Reliability-diagram rows, one per bin (Guo et al. 2017, fig. 1).

    Each dict has ``bin`` (0-based index), ``lower``, ``upper`` (edges), ``count`` (int),
    ``mean_confidence`` and ``accuracy`` (NaN for empty bins).
    """
    edges, count, conf_sum, corr_sum, _ = _bin_stats(confidences, correct, n_bins)
    rows = []
    for b in range(int(n_bins)):
        c = int(count[b])
        rows.append(
            {
                "bin": b,
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": c,
                "mean_confidence": float(conf_sum[b] / c) if c else float("nan"),
                "accuracy": float(corr_sum[b] / c) if c else float("nan"),
            }
        )
    return rows


def brier_score(probs: Any, labels: Any) -> float:
    """Brier score (Brier 1950).

    * ``probs`` N × C (rows are class probabilities), ``labels`` (N,) ints in [0, C): the
      multi-class form (1/N) Σ_i Σ_c (p_ic − y_ic)², y one-hot. Perfect one-hot → 0; uniform
      over C classes → (C − 1) / C.
    * ``probs`` 1-D (N,) = probability of class 1, ``labels`` in {0, 1}: the usual binary form
      (1/N) Σ_i (p_i − y_i)² (as ``sklearn.metrics.brier_score_loss``), i.e. half the two-class
      multi-class value.
    """
    p = as_numpy(probs)
    y = as_numpy(labels, dtype=None)
    if p.ndim not in (1, 2) or p.shape[0] < 1:
        raise ValueError(f"probs must be (N,) or (N, C) with N ≥ 1, got shape {p.shape}")
    if y.shape != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},), got {y.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or infinite values")
    n_cls = 2 if p.ndim == 1 else p.shape[1]
    yi = y.astype(np.int64)
    if not np.all(yi == y) or np.any(yi < 0) or np.any(yi >= n_cls):
        raise ValueError(f"labels must be integers in [0, {n_cls})")
    if p.ndim == 1:
        return float(np.mean((p - yi) ** 2))
    onehot = np.zeros_like(p)
    onehot[np.arange(p.shape[0]), yi] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))
