"""Robust companions of the spectral and cosine metrics under massive activations.

A few hidden-state coordinates of LLMs take huge values on a few tokens ("massive activations",
Sun et al. 2024; "rogue dimensions", Timkey & van Schijndel 2021). On SmolLM2 one coordinate
reaches |h| ≈ 800 at layers 3–10 and then dominates the covariance spectrum (stable rank,
participation ratio, top-PC share) and the raw cosine anisotropy is almost entirely the shared
mean direction. The companions below are computed next to the raw metrics and stored with the
suffixes documented in :data:`ROBUST_METRICS`:

- ``<metric>_robust``: the spectral metric of the covariance with the ``k`` largest-variance
  coordinates removed (rows and columns dropped before the eigendecomposition; Timkey & van
  Schijndel 2021 drop rogue dimensions the same way). ``k`` = :data:`ROGUE_K`.
- ``anisotropy_centred``: mean pairwise cosine similarity of the token subsample after
  subtracting its mean (the "centred cosine" of Timkey & van Schijndel 2021; Ethayarajh 2019's
  anisotropy without the common mean direction).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .spectral import (
    effective_rank_from_eigenvalues,
    eigenvalues_from_covariance,
    participation_ratio_from_eigenvalues,
    stable_rank_from_eigenvalues,
    top_pc_share_from_eigenvalues,
)

#: Number of largest-variance coordinates removed for the ``*_robust`` metrics.
ROGUE_K = 3

#: Robust companion → the raw metric it accompanies.
ROBUST_METRICS: dict[str, str] = {
    "effective_rank_robust": "effective_rank",
    "stable_rank_robust": "stable_rank",
    "participation_ratio_robust": "participation_ratio",
    "top_pc_share_robust": "top_pc_share",
    "anisotropy_centred": "anisotropy_cosine",
}


def rogue_dimensions(covariance: Any, k: int = ROGUE_K) -> np.ndarray:
    """Indices of the ``k`` coordinates with the largest variance (diagonal of the covariance),
    largest first."""
    var = np.diag(np.asarray(covariance, dtype=np.float64))
    k = max(0, min(int(k), var.size - 1))
    return np.argsort(-var, kind="stable")[:k]


def spectral_without_rogue(
    covariance: Any, k: int = ROGUE_K, n_samples: int | None = None
) -> dict[str, float]:
    """Effective rank, stable rank, participation ratio and top-PC share of the covariance
    restricted to every coordinate except the ``k`` largest-variance ones (:func:`rogue_dimensions`).
    Keys are the ``*_robust`` names of :data:`ROBUST_METRICS`. ``n_samples`` goes to
    :func:`~collapse_core.metrics.spectral.eigenvalues_from_covariance` (a principal submatrix
    of a covariance of n samples has rank ≤ n − 1 too)."""
    cov = np.asarray(covariance, dtype=np.float64)
    keep = np.setdiff1d(np.arange(cov.shape[0]), rogue_dimensions(cov, k))
    eig = eigenvalues_from_covariance(cov[np.ix_(keep, keep)], n_samples)
    return {
        "effective_rank_robust": effective_rank_from_eigenvalues(eig),
        "stable_rank_robust": stable_rank_from_eigenvalues(eig),
        "participation_ratio_robust": participation_ratio_from_eigenvalues(eig),
        "top_pc_share_robust": top_pc_share_from_eigenvalues(eig),
    }


def centred_cosine_anisotropy(vectors: Any, weights: Any | None = None) -> float:
    """Mean pairwise cosine similarity of the rows of ``vectors`` (N × d) after subtracting
    their (weighted) mean: with unit rows uᵢ of xᵢ − x̄, (‖Σ wᵢuᵢ‖² − Σ wᵢ²) / ((Σwᵢ)² − Σ wᵢ²),
    i.e. the average of uᵢ·uⱼ over pairs i ≠ j. ``weights`` (multiplicities, e.g. from a
    bootstrap) default to 1. NaN with fewer than 2 rows."""
    x = np.asarray(vectors, dtype=np.float64)
    w = np.ones(x.shape[0]) if weights is None else np.asarray(weights, dtype=np.float64)
    total = w.sum()
    if x.shape[0] < 2 or total**2 - np.sum(w**2) <= 0:
        return float("nan")
    centred = x - (w @ x) / total
    norms = np.linalg.norm(centred, axis=1, keepdims=True)
    unit = centred / np.where(norms > 0, norms, 1.0)
    s = w @ unit
    return float((s @ s - np.sum(w**2 * (norms[:, 0] > 0))) / (total**2 - np.sum(w**2)))


def robust_companions(
    covariance: Any,
    sampled: Any | None = None,
    k: int = ROGUE_K,
    n_samples: int | None = None,
) -> dict[str, float]:
    """All robust companions of one layer: :func:`spectral_without_rogue` of the full-data
    covariance, plus :func:`centred_cosine_anisotropy` of the token subsample when given."""
    out = spectral_without_rogue(covariance, k, n_samples)
    if sampled is not None and len(sampled) >= 2:
        out["anisotropy_centred"] = centred_cosine_anisotropy(sampled)
    return out
