"""Subspaces of weight updates: principal angles, overlap, update spectra, intruder dimensions.

Bases are column matrices d × r (d ≥ r). A LoRA ``A`` (r × in) spans its row space, so pass
``A.T``; a LoRA ``B`` (out × r) is already a column basis.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .spectral import (
    _as_matrix,
    as_numpy,
    effective_rank_from_singular_values,
    stable_rank_from_singular_values,
)

__all__ = [
    "intruder_dimensions",
    "orthonormal_basis",
    "principal_angles",
    "subspace_overlap",
    "top_singular_subspace",
    "update_spectrum_metrics",
]

_EPS64 = float(np.finfo(np.float64).eps)


def orthonormal_basis(U: Any, name: str = "U") -> np.ndarray:
    """Orthonormalise the columns of U (d × r, d ≥ r; a 1-D vector is one column) by reduced QR.

    Raises ValueError if the columns are linearly dependent (|R_kk| ≤ max|R_kk| · d · eps).
    """
    a = as_numpy(U)
    if a.ndim == 1:
        a = a[:, None]
    a = _as_matrix(a, name, min_rows=1)
    d, r = a.shape
    if r > d:
        raise ValueError(f"{name} must be a d × r basis with d ≥ r (transpose it?), got {a.shape}")
    q, rr = np.linalg.qr(a)
    diag = np.abs(np.diag(rr))
    if diag.max() <= 0.0 or np.any(diag <= diag.max() * d * _EPS64):
        raise ValueError(f"{name} has linearly dependent columns (rank < {r})")
    return q


def principal_angles(U: Any, V: Any) -> np.ndarray:
    """Principal angles θ_1 ≤ … ≤ θ_m (radians, m = min(r₁, r₂)) between span(U) and span(V).

    Björck & Golub 1973: after orthonormalising (QR), cos θ_k are the singular values of
    Q_Uᵀ Q_V. For accuracy at small angles, θ_k with cos² θ_k ≥ 1/2 are taken from the sines,
    the singular values of Q_b − Q_a (Q_aᵀ Q_b) (Knyazev & Argentati 2002), as in
    ``scipy.linalg.subspace_angles``.
    """
    qu = orthonormal_basis(U, "U")
    qv = orthonormal_basis(V, "V")
    if qu.shape[0] != qv.shape[0]:
        raise ValueError(
            f"U and V must have the same ambient dimension, got {qu.shape[0]}, {qv.shape[0]}"
        )
    qa, qb = (qu, qv) if qu.shape[1] >= qv.shape[1] else (qv, qu)
    c = qa.T @ qb
    cos = np.clip(np.linalg.svd(c, compute_uv=False), 0.0, 1.0)  # descending
    sin = np.clip(np.linalg.svd(qb - qa @ c, compute_uv=False), 0.0, 1.0)[::-1]  # ascending
    return np.where(cos**2 >= 0.5, np.arcsin(sin), np.arccos(cos))


def subspace_overlap(U: Any, V: Any) -> float:
    """Subspace overlap ‖Q_Uᵀ Q_V‖_F² / min(r₁, r₂) ∈ [0, 1] = mean cos² of the principal angles.

    1 when the smaller subspace lies inside the larger, 0 when they are orthogonal.
    """
    qu = orthonormal_basis(U, "U")
    qv = orthonormal_basis(V, "V")
    if qu.shape[0] != qv.shape[0]:
        raise ValueError(
            f"U and V must have the same ambient dimension, got {qu.shape[0]}, {qv.shape[0]}"
        )
    return float(np.linalg.norm(qu.T @ qv) ** 2 / min(qu.shape[1], qv.shape[1]))


def update_spectrum_metrics(delta_w: Any, k: int | None = None) -> dict[str, float]:
    """Spectrum of a weight update ΔW (out × in), e.g. a LoRA ΔW = B A · scaling.

    Uses the *uncentred* singular values σ of ΔW. Keys: ``effective_rank``
    (Roy & Vetterli 2007 with RankMe ε), ``stable_rank`` (Σσ²/σ_max²), ``frobenius_norm``,
    ``spectral_norm``; if ``k`` is given also ``top_k_energy`` = Σ_{i≤k} σ_i² / Σ σ_i² (for a
    LoRA of rank r, k = r gives 1 up to rounding).
    """
    w = _as_matrix(delta_w, "delta_w", min_rows=1)
    sv = np.linalg.svd(w, compute_uv=False)
    out = {
        "effective_rank": effective_rank_from_singular_values(sv, rtol=max(w.shape) * _EPS64),
        "stable_rank": stable_rank_from_singular_values(sv),
        "frobenius_norm": float(np.sqrt(np.sum(sv**2))),
        "spectral_norm": float(sv[0]),
    }
    if k is not None:
        if int(k) != k or k < 1:
            raise ValueError(f"k must be a positive integer, got {k}")
        total = float(np.sum(sv**2))
        out["top_k_energy"] = (
            float(np.sum(sv[: int(k)] ** 2) / total) if total > 0 else float("nan")
        )
    return out


def top_singular_subspace(W: Any, k: int) -> np.ndarray:
    """The top-k left singular vectors of W (d × m) as a d × k orthonormal matrix."""
    w = _as_matrix(W, "W", min_rows=1)
    if int(k) != k or not 1 <= k <= min(w.shape):
        raise ValueError(f"k must be an integer in [1, {min(w.shape)}], got {k}")
    u, _, _ = np.linalg.svd(w, full_matrices=False)
    return u[:, : int(k)]


def intruder_dimensions(W0: Any, W1: Any, k: int = 10, threshold: float = 0.5) -> int:
    """Number of intruder dimensions among the top-k singular vectors of the fine-tuned W1.

    Shuttleworth et al. 2024 ("LoRA vs full fine-tuning: an illusion of equivalence"): a left
    singular vector y_j (j ≤ k) of W1 is an intruder if max_i |cos(y_j, x_i)| < threshold over
    ALL left singular vectors x_i of the base W0 (reduced SVD, min(out, in) of them).
    """
    w0 = _as_matrix(W0, "W0", min_rows=1)
    w1 = _as_matrix(W1, "W1", min_rows=1)
    if w0.shape != w1.shape:
        raise ValueError(f"W0 and W1 must have the same shape, got {w0.shape} and {w1.shape}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    # float32 SVDs: cosines are compared with a threshold of ~0.5, far above float32 error,
    # and this runs for every adapted module of every stage.
    u0, _, _ = np.linalg.svd(w0.astype(np.float32), full_matrices=False)
    u1, _, _ = np.linalg.svd(w1.astype(np.float32), full_matrices=False)
    if int(k) != k or not 1 <= k <= min(w1.shape):
        raise ValueError(f"k must be an integer in [1, {min(w1.shape)}], got {k}")
    y = u1[:, : int(k)].astype(np.float64)
    max_cos = np.max(np.abs(u0.T @ y), axis=0)
    return int(np.sum(max_cos < threshold))
