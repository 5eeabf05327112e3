"""Geometry of token representations: anisotropy, intrinsic dimension, CKA, homogeneity, NC1.

Rows of X are token vectors (N × d). Cosine-based metrics use the *uncentred* rows; rows with
zero norm have no direction and are excluded (their cosine is undefined). The streaming forms
expect the same: sums of unit vectors and counts over non-zero rows only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .spectral import _as_matrix, as_numpy

__all__ = [
    "anisotropy_cosine",
    "anisotropy_cosine_from_sums",
    "homogeneity",
    "homogeneity_from_sums",
    "linear_cka",
    "nc1",
    "twonn_dimension",
    "unit_rows",
]

#: Relative cut-off on singular values of the centred class means in NC1's pseudo-inverse.
NC1_RCOND = 1e-8


def unit_rows(X: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (x̂, keep): the non-zero rows of X scaled to unit L2 norm, and the boolean row mask."""
    arr = _as_matrix(X, min_rows=1)
    norms = np.linalg.norm(arr, axis=1)
    keep = norms > 0.0
    return arr[keep] / norms[keep, None], keep


def anisotropy_cosine_from_sums(sum_unit: Any, n: int) -> float:
    """Mean pairwise cosine (i ≠ j) from streaming sums: (‖Σ x̂‖² − n) / (n (n − 1)).

    ``sum_unit`` is Σ x̂ over the n non-zero rows x̂ = x/‖x‖ (Ethayarajh 2019). Since
    ‖Σ x̂‖² = Σ_i Σ_j cos(x_i, x_j) and the n diagonal terms are 1, this is the exact mean.
    """
    s = as_numpy(sum_unit)
    if s.ndim != 1:
        raise ValueError(f"sum_unit must be a 1-D vector (d,), got shape {s.shape}")
    if int(n) != n or n < 2:
        raise ValueError(f"anisotropy needs n ≥ 2 non-zero rows, got n={n}")
    return float((np.dot(s, s) - n) / (n * (n - 1)))


def anisotropy_cosine(X: Any) -> float:
    """Anisotropy: mean cosine similarity over pairs i ≠ j of uncentred rows (Ethayarajh 2019).

    Computed as (‖Σ_i x̂_i‖² − N) / (N (N − 1)) with x̂_i = x_i / ‖x_i‖ over the N non-zero rows.
    """
    xh, _ = unit_rows(X)
    if xh.shape[0] < 2:
        raise ValueError(f"anisotropy needs at least 2 non-zero rows, got {xh.shape[0]}")
    return anisotropy_cosine_from_sums(xh.sum(axis=0), xh.shape[0])


#: A row whose nearest squared distance in the Gram form is below this fraction of
#: ‖x‖² + max ‖y‖² is recomputed from differences: there the form's absolute error (~d · eps ·
#: that sum, from cancellation) could matter; elsewhere it is below 1e-9 of the distance.
_CANCELLATION_FLOOR = 1e-4


def _two_nearest_distances(X: np.ndarray) -> np.ndarray:
    """Euclidean distances (N × 2) from each row to its 1st and 2nd nearest other row.

    Brute force in chunks: squared distances ‖x‖² + ‖y‖² − 2 x·y (one matrix product per chunk)
    and the two smallest per row by ``np.partition``. Rows whose nearest squared distance is
    below :data:`_CANCELLATION_FLOOR` of the norms (duplicates, near-duplicates: where the
    product form cancels) take the distances to their 4 best candidates again, exactly, from
    differences, so exact duplicates give exactly 0. On SmolLM2's 512 × 576 samples (31 layers)
    this takes 0.2 s against 0.3 s for recomputing every row, and the other rows' distances
    move by < 1e-9 relative (1.7e-12 there).
    """
    n = X.shape[0]
    n_cand = min(4, n - 1)
    sq = np.einsum("ij,ij->i", X, X)
    scale = float(sq.max())
    chunk = max(1, (1 << 22) // n)
    out = np.empty((n, 2))
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        d2 = X[lo:hi] @ X.T
        d2 *= -2.0
        d2 += sq[lo:hi, None]
        d2 += sq[None, :]
        rows = np.arange(hi - lo)
        d2[rows, rows + lo] = np.inf  # exclude self
        two = np.partition(d2, 1, axis=1)[:, :2]
        np.maximum(two, 0.0, out=two)
        close = np.flatnonzero(two[:, 0] < _CANCELLATION_FLOOR * (sq[lo:hi] + scale))
        if close.size:
            cand = np.argpartition(d2[close], n_cand - 1, axis=1)[:, :n_cand]
            exact = np.empty((close.size, n_cand))
            for j in range(n_cand):
                diff = X[lo + close] - X[cand[:, j]]
                exact[:, j] = np.einsum("ij,ij->i", diff, diff)
            exact.sort(axis=1)
            two[close] = exact[:, :2]
        out[lo:hi] = np.sqrt(two)
    return out


def twonn_dimension(
    X: Any,
    discard_fraction: float = 0.1,
    seed: int = 0,
    max_points: int | None = None,
    method: str = "fit",
) -> float:
    """TwoNN intrinsic dimension (Facco, d'Errico, Rodriguez & Laio 2017, Sci. Rep. 7:12140).

    For each point, μ_i = r₂ / r₁, the ratio of the distances to its 2nd and 1st nearest
    neighbours. Points with r₁ = 0 (duplicates) are dropped. Under local uniformity
    F(μ) = 1 − μ^−d, so −log(1 − F(μ)) = d · log μ.

    * ``method="fit"`` (default, as in the paper): sort the n values μ ascending, set the
      empirical F(μ_(i)) = i / n, discard the largest ``discard_fraction`` of them (the point
      with F = 1 is always discarded), and fit a straight line through the origin of
      y = −log(1 − F) against x = log μ by least squares: d = Σ x y / Σ x².
    * ``method="mle"``: the maximum-likelihood estimate d = (n − 1) / Σ_i log μ_i over all μ
      (``discard_fraction`` is not used).

    If ``max_points`` is set and N exceeds it, a random subsample of that size is used
    (``numpy.random.default_rng(seed)``). Returns NaN when every μ equals 1 (no scale
    information). Brute-force neighbours: N=2000, d=576 takes well under a second.
    """
    arr = _as_matrix(X, min_rows=3)
    if not 0.0 <= discard_fraction < 1.0:
        raise ValueError(f"discard_fraction must be in [0, 1), got {discard_fraction}")
    if method not in ("fit", "mle"):
        raise ValueError(f"method must be 'fit' or 'mle', got {method!r}")
    if max_points is not None and arr.shape[0] > max_points:
        if max_points < 3:
            raise ValueError(f"max_points must be ≥ 3, got {max_points}")
        rng = np.random.default_rng(seed)
        arr = arr[np.sort(rng.choice(arr.shape[0], size=max_points, replace=False))]
    r = _two_nearest_distances(arr)
    r = r[r[:, 0] > 0.0]
    if r.shape[0] < 2:
        raise ValueError("TwoNN needs at least 2 points with a non-duplicate nearest neighbour")
    log_mu = np.sort(np.log(r[:, 1] / r[:, 0]))
    if method == "mle":
        total = log_mu.sum()
        return float((log_mu.size - 1) / total) if total > 0 else float("nan")
    n = log_mu.size
    n_keep = min(int(np.floor(n * (1.0 - discard_fraction))), n - 1)
    x = log_mu[:n_keep]
    y = -np.log1p(-np.arange(1, n_keep + 1) / n)
    denom = np.dot(x, x)
    return float(np.dot(x, y) / denom) if denom > 0 else float("nan")


def linear_cka(X: Any, Y: Any) -> float:
    """Linear CKA (Kornblith, Norouzi, Lee & Hinton 2019) between X (N × d₁) and Y (N × d₂).

    With column-centred X, Y: CKA = ‖Yᵀ X‖_F² / (‖Xᵀ X‖_F ‖Yᵀ Y‖_F). The feature-space form is
    used when N ≥ max(d₁, d₂); otherwise the identical Gram form ⟨K_X, K_Y⟩_F / (‖K_X‖_F ‖K_Y‖_F)
    with K = X Xᵀ. Invariant to orthogonal transforms and isotropic scaling of either side.
    Returns NaN if either centred matrix is all zero (constant rows).
    """
    x = _as_matrix(X, "X")
    y = _as_matrix(Y, "Y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"X and Y need the same rows (tokens), got {x.shape[0]} and {y.shape[0]}")
    x = x - x.mean(axis=0, keepdims=True)
    y = y - y.mean(axis=0, keepdims=True)
    if x.shape[0] >= max(x.shape[1], y.shape[1]):
        num = np.linalg.norm(y.T @ x) ** 2
        den = np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)
    else:
        kx = x @ x.T
        ky = y @ y.T
        num = np.sum(kx * ky)
        den = np.linalg.norm(kx) * np.linalg.norm(ky)
    return float(num / den) if den > 0 else float("nan")


def homogeneity_from_sums(prompt_unit_sums: Any, prompt_counts: Any) -> dict[str, float]:
    """Within- vs between-prompt mean cosine from per-prompt sums of unit vectors.

    With s_p = Σ_{i∈p} x̂_i (P × d) and n_p the number of non-zero token vectors of prompt p:

    * within = Σ_p (‖s_p‖² − n_p) / Σ_p n_p (n_p − 1)  (pairs i ≠ j in the same prompt)
    * between = (‖Σ_p s_p‖² − Σ_p ‖s_p‖²) / ((Σ_p n_p)² − Σ_p n_p²)  (pairs in different prompts)
    * homogeneity_gap = within − between

    Returns a dict with keys ``within_prompt_cosine``, ``between_prompt_cosine`` and
    ``homogeneity_gap``; a value is NaN when it has no pairs (every prompt has one token, or
    there is only one prompt). Cosines of uncentred vectors as in Ethayarajh 2019.
    """
    s = as_numpy(prompt_unit_sums)
    n = as_numpy(prompt_counts)
    if s.ndim != 2 or n.ndim != 1 or s.shape[0] != n.size:
        raise ValueError(
            f"prompt_unit_sums must be (P, d) and prompt_counts (P,), got {s.shape} and {n.shape}"
        )
    if np.any(n < 0):
        raise ValueError("prompt_counts must be non-negative")
    sq = np.einsum("ij,ij->i", s, s)
    within_pairs = float(np.sum(n * (n - 1)))
    between_pairs = float(n.sum() ** 2 - np.sum(n**2))
    total = s.sum(axis=0)
    within = float(np.sum(sq - n) / within_pairs) if within_pairs > 0 else float("nan")
    between = (
        float((np.dot(total, total) - sq.sum()) / between_pairs)
        if between_pairs > 0
        else float("nan")
    )
    return {
        "within_prompt_cosine": within,
        "between_prompt_cosine": between,
        "homogeneity_gap": within - between,
    }


def homogeneity(X: Any, prompt_ids: Any) -> dict[str, float]:
    """Mean pairwise cosine of uncentred token vectors within vs between prompts.

    ``prompt_ids`` (N,) gives each row's prompt. Zero rows are excluded. Returns the dict of
    :func:`homogeneity_from_sums` (within_prompt_cosine, between_prompt_cosine, homogeneity_gap),
    computed exactly from per-prompt sums of unit vectors.
    """
    arr = _as_matrix(X, min_rows=2)
    ids = as_numpy(prompt_ids, dtype=None)
    if ids.shape != (arr.shape[0],):
        raise ValueError(f"prompt_ids must have shape ({arr.shape[0]},), got {ids.shape}")
    xh, keep = unit_rows(arr)
    _, inverse = np.unique(ids[keep], return_inverse=True)
    n_prompts = int(inverse.max()) + 1 if inverse.size else 0
    sums = np.zeros((n_prompts, arr.shape[1]))
    np.add.at(sums, inverse, xh)
    counts = np.bincount(inverse, minlength=n_prompts).astype(np.float64)
    return homogeneity_from_sums(sums, counts)


def nc1(X: Any, labels: Any) -> float:
    """Neural-collapse NC1 variability: Tr(Σ_W Σ_B⁺) / C (Papyan, Han & Donoho 2020).

    Classes are the distinct ``labels`` (e.g. next-token ids); classes with fewer than 2 members
    are skipped (no within-class spread) and C counts the remaining classes. Over the remaining
    samples: μ_c class means, μ_G the global mean,
    Σ_W = (1/N') Σ_c Σ_{i∈c} (h_i − μ_c)(h_i − μ_c)ᵀ, Σ_B = (1/C) Σ_c (μ_c − μ_G)(μ_c − μ_G)ᵀ,
    and ⁺ the Moore–Penrose pseudo-inverse of Σ_B over at most C − 1 directions, dropping those
    with eigenvalue ≤ 1e-16 · λ_max (singular value of the centred means ≤ 1e-8 · max): below
    that, between-class directions are rounding noise and would blow up the trace.
    Lower is more collapsed. Returns NaN if fewer than 2 classes remain or Σ_B = 0.
    """
    arr = _as_matrix(X, min_rows=2)
    lab = as_numpy(labels, dtype=None)
    if lab.shape != (arr.shape[0],):
        raise ValueError(f"labels must have shape ({arr.shape[0]},), got {lab.shape}")
    classes, inverse, counts = np.unique(lab, return_inverse=True, return_counts=True)
    big = counts >= 2
    if int(big.sum()) < 2:
        return float("nan")
    keep = big[inverse]
    h = arr[keep]
    _, cls = np.unique(inverse[keep], return_inverse=True)
    n_cls = int(cls.max()) + 1
    cnt = np.bincount(cls, minlength=n_cls).astype(np.float64)
    sums = np.zeros((n_cls, h.shape[1]))
    np.add.at(sums, cls, h)
    means = sums / cnt[:, None]
    within = h - means[cls]  # (N', d)
    m = (means - h.mean(axis=0)).T  # d × C; Σ_B = m mᵀ / C
    u, s, _ = np.linalg.svd(m, full_matrices=False)
    if s.size == 0 or s[0] <= 0.0:
        return float("nan")
    good = s > s[0] * NC1_RCOND
    good[n_cls - 1 :] = False  # centred class means span at most C − 1 directions
    u, s = u[:, good], s[good]
    # Tr(Σ_W Σ_B⁺) = Σ_k (C / s_k²) · u_kᵀ Σ_W u_k, and u_kᵀ Σ_W u_k = ‖within u_k‖² / N'
    proj = within @ u
    quad = np.sum(proj**2, axis=0) / h.shape[0]
    return float(np.sum(quad * n_cls / s**2) / n_cls)
