"""Dormant units (Sokar, Agarwal, Castro & Evci 2023, "The dormant neuron phenomenon in deep RL")."""

from __future__ import annotations

from typing import Any

import numpy as np

from .spectral import as_numpy

__all__ = ["dormant_fraction", "dormant_fraction_from_mean_abs", "unit_scores_from_mean_abs"]


def unit_scores_from_mean_abs(mean_abs: Any) -> np.ndarray:
    """Normalised unit scores s_i = E|h_i| / ((1/K) Σ_k E|h_k|) (Sokar et al. 2023, eq. 1).

    ``mean_abs`` (K,) holds E|h_i| per unit. If every unit is silent (mean 0) all scores are 0.
    """
    m = as_numpy(mean_abs)
    if m.ndim != 1 or m.size < 1:
        raise ValueError(f"mean_abs must be a non-empty 1-D array (units,), got shape {m.shape}")
    if np.any(m < 0) or not np.all(np.isfinite(m)):
        raise ValueError("mean_abs must be finite and non-negative")
    avg = m.mean()
    return np.zeros_like(m) if avg <= 0.0 else m / avg


def dormant_fraction_from_mean_abs(mean_abs: Any, tau: float = 0.0) -> float:
    """Fraction of units with s_i ≤ τ, s_i = E|h_i| / mean_k E|h_k| (Sokar et al. 2023).

    τ = 0 counts exactly-silent units; Sokar et al. use τ ∈ {0, 0.025, 0.1}. If all units are
    silent, every unit is dormant (1.0).
    """
    if tau < 0:
        raise ValueError(f"tau must be ≥ 0, got {tau}")
    return float(np.mean(unit_scores_from_mean_abs(mean_abs) <= tau))


def dormant_fraction(acts: Any, tau: float = 0.0) -> float:
    """Dormant-unit fraction of an activation matrix ``acts`` (N × units) (Sokar et al. 2023).

    E|h_i| is the mean of |acts[:, i]| over rows; leading dimensions beyond two (e.g.
    batch × seq × units) are flattened into rows. See :func:`dormant_fraction_from_mean_abs`.
    """
    a = as_numpy(acts)
    if a.ndim < 2 or a.shape[-1] < 1 or a.size == 0:
        raise ValueError(f"acts must be N × units with N ≥ 1, got shape {a.shape}")
    a = a.reshape(-1, a.shape[-1])
    return dormant_fraction_from_mean_abs(np.abs(a).mean(axis=0), tau)
