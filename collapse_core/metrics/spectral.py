"""Spectral metrics of a hidden-state matrix H (N tokens × d features).

Conventions (pinned; see DESIGN.md "Metrics"):

* ``X`` is centred internally by subtracting its column mean unless ``center=False``.
* σ are the singular values of the (centred) ``X``; λ = σ² / (N − 1) are the eigenvalues of the
  unbiased sample covariance. Ratios of spectra (effective rank, stable rank, participation
  ratio, top-PC share, α-ReQ slope) do not depend on the 1/(N − 1) factor.
* Numerically-zero singular values (σ ≤ σ_max · max(N, d) · eps, the ``numpy.linalg.matrix_rank``
  tolerance) are treated as exact zeros.
* A degenerate all-zero spectrum (e.g. constant rows, i.e. total collapse) gives 0.0 for the
  rank-like metrics (effective rank, stable rank, participation ratio) and NaN where the metric
  is undefined (top-PC share, α-ReQ).

Every function accepts numpy arrays or torch tensors and computes in float64.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = [
    "RANKME_EPS",
    "alpha_req",
    "alpha_req_from_eigenvalues",
    "as_numpy",
    "batch_moments",
    "covariance_eigenvalues",
    "covariance_from_moments",
    "effective_rank",
    "effective_rank_from_eigenvalues",
    "effective_rank_from_singular_values",
    "eigenvalues_from_covariance",
    "mean_from_moments",
    "participation_ratio",
    "participation_ratio_from_eigenvalues",
    "singular_values",
    "spectral_metrics_from_eigenvalues",
    "stable_rank",
    "stable_rank_from_eigenvalues",
    "stable_rank_from_singular_values",
    "top_pc_share",
    "top_pc_share_from_eigenvalues",
]

#: ε added to the normalised singular values in the effective rank (Garrido et al. 2023, RankMe).
RANKME_EPS = 1e-7
#: Eigenvalues ≤ this fraction of λ_max are excluded from the α-ReQ fit (log of ~0 is meaningless).
ALPHA_REQ_REL_FLOOR = 1e-12

_EPS64 = float(np.finfo(np.float64).eps)


def as_numpy(x: Any, dtype: Any = np.float64) -> np.ndarray:
    """Convert a numpy array, torch tensor or sequence to a numpy array.

    Torch tensors are detached and moved to CPU (``x.detach().cpu().double().numpy()`` for the
    default float64 dtype). ``dtype=None`` keeps the input's dtype (used for integer labels).
    """
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        t = x.detach().cpu()
        if dtype is not None and np.dtype(dtype) == np.float64:
            return t.double().numpy()
        if t.dtype.is_floating_point and t.element_size() < 4:  # bf16/fp16 have no numpy view
            t = t.float()
        arr = t.numpy()
        return arr if dtype is None else arr.astype(dtype, copy=False)
    return np.asarray(x) if dtype is None else np.asarray(x, dtype=dtype)


def _as_matrix(X: Any, name: str = "X", min_rows: int = 2) -> np.ndarray:
    """Return X as a float64 2-D array with at least ``min_rows`` rows and one column."""
    arr = as_numpy(X)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array (N × d), got shape {arr.shape}")
    if arr.shape[0] < min_rows or arr.shape[1] < 1:
        raise ValueError(
            f"{name} needs at least {min_rows} rows and 1 column, got shape {arr.shape}"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_spectrum(values: Any, name: str) -> np.ndarray:
    """Return a 1-D non-negative float64 spectrum sorted descending (tiny negatives clipped)."""
    arr = as_numpy(values)
    if arr.ndim != 1 or arr.size < 1:
        raise ValueError(f"{name} must be a non-empty 1-D array, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.sort(np.clip(arr, 0.0, None))[::-1]


def _drop_numerical_zeros(spectrum: np.ndarray, rtol: float) -> np.ndarray:
    """Keep entries > rtol · max (the spectrum is descending and non-negative)."""
    if spectrum.size == 0 or spectrum[0] <= 0.0:
        return spectrum[:0]
    return spectrum[spectrum > rtol * spectrum[0]]


def singular_values(X: Any, center: bool = True) -> np.ndarray:
    """Singular values σ of X (N × d), descending, length min(N, d).

    With ``center=True`` the column mean is subtracted first, so σ² / (N − 1) are the
    eigenvalues of the sample covariance.
    """
    arr = _as_matrix(X, min_rows=2 if center else 1)
    if center:
        arr = arr - arr.mean(axis=0, keepdims=True)
    return np.linalg.svd(arr, compute_uv=False)


def covariance_eigenvalues(X: Any) -> np.ndarray:
    """Eigenvalues λ of the unbiased sample covariance of X (N × d), descending, length d.

    λ_i = σ_i² / (N − 1) with σ the singular values of the centred X, padded with zeros to d.
    """
    arr = _as_matrix(X)
    sv = singular_values(arr)
    eig = np.zeros(arr.shape[1])
    eig[: sv.size] = sv**2 / (arr.shape[0] - 1)
    return eig


def effective_rank_from_singular_values(sv: Any, rtol: float | None = None) -> float:
    """Effective rank exp(−Σ_i p_i log p_i), p_i = σ_i / Σ_j σ_j + ε with ε = 1e-7.

    Roy & Vetterli 2007 ("The effective rank"); the ε follows Garrido et al. 2023 (RankMe).
    Zero singular values are ignored before ε is added: entries ≤ rtol · σ_max count as zero,
    rtol defaulting to len(sv) · float64 eps. An all-zero spectrum returns 0.0.
    """
    s = _as_spectrum(sv, "sv")
    s = _drop_numerical_zeros(s, s.size * _EPS64 if rtol is None else rtol)
    if s.size == 0:
        return 0.0
    p = s / s.sum() + RANKME_EPS
    return float(np.exp(-np.sum(p * np.log(p))))


def effective_rank_from_eigenvalues(eig: Any, rtol: float | None = None) -> float:
    """Effective rank from covariance eigenvalues: σ_i ∝ √λ_i, then as the singular-value form.

    Roy & Vetterli 2007; RankMe ε (Garrido et al. 2023). Eigenvalues ≤ rtol · λ_max count as
    zero, rtol defaulting to len(eig) · float64 eps (the accuracy of ``eigvalsh`` on a
    covariance; a √ of eigen-solver noise would otherwise look like real spectrum).
    """
    lam = _as_spectrum(eig, "eig")
    lam = _drop_numerical_zeros(lam, lam.size * _EPS64 if rtol is None else rtol)
    if lam.size == 0:
        return 0.0
    return effective_rank_from_singular_values(np.sqrt(lam), rtol=0.0)


def effective_rank(X: Any, center: bool = True) -> float:
    """Effective rank of X (N × d): exp(−Σ p_i log p_i), p = σ/Σσ + 1e-7 over σ of centred X.

    Roy & Vetterli 2007; Garrido et al. 2023 (RankMe). Singular values ≤ σ_max · max(N, d) · eps
    are ignored (``matrix_rank`` tolerance).
    """
    arr = _as_matrix(X, min_rows=2 if center else 1)
    sv = singular_values(arr, center=center)
    return effective_rank_from_singular_values(sv, rtol=max(arr.shape) * _EPS64)


def stable_rank_from_singular_values(sv: Any) -> float:
    """Stable rank Σ_i σ_i² / σ_max² (Rudelson & Vershynin 2007). All-zero spectrum → 0.0."""
    s = _as_spectrum(sv, "sv")
    if s[0] <= 0.0:
        return 0.0
    return float(np.sum((s / s[0]) ** 2))


def stable_rank_from_eigenvalues(eig: Any) -> float:
    """Stable rank from covariance eigenvalues: Σλ / λ_max (= Σσ²/σ_max²). All-zero → 0.0."""
    lam = _as_spectrum(eig, "eig")
    if lam[0] <= 0.0:
        return 0.0
    return float(np.sum(lam / lam[0]))


def stable_rank(X: Any, center: bool = True) -> float:
    """Stable rank Σσ² / σ_max² of the (centred) X (N × d) (Rudelson & Vershynin 2007)."""
    return stable_rank_from_singular_values(singular_values(X, center=center))


def participation_ratio_from_eigenvalues(eig: Any) -> float:
    """Participation ratio (Σλ)² / Σλ² of covariance eigenvalues λ (Gao et al. 2017).

    All-zero spectrum → 0.0.
    """
    lam = _as_spectrum(eig, "eig")
    if lam[0] <= 0.0:
        return 0.0
    lam = lam / lam[0]  # scale-free; avoids overflow of λ² for huge activations
    return float(lam.sum() ** 2 / np.sum(lam**2))


def participation_ratio(X: Any) -> float:
    """Participation ratio (Σλ)² / Σλ², λ the covariance eigenvalues of X (N × d) (Gao et al. 2017)."""
    return participation_ratio_from_eigenvalues(covariance_eigenvalues(X))


def top_pc_share_from_eigenvalues(eig: Any) -> float:
    """Share of variance in the top principal component, λ_max / Σλ. All-zero spectrum → NaN."""
    lam = _as_spectrum(eig, "eig")
    total = lam.sum()
    if total <= 0.0:
        return float("nan")
    return float(lam[0] / total)


def top_pc_share(X: Any) -> float:
    """Top-PC variance share λ_max / Σλ of the covariance of X (N × d) (anisotropy measure)."""
    return top_pc_share_from_eigenvalues(covariance_eigenvalues(X))


def alpha_req_from_eigenvalues(
    eig: Any, fit_range: tuple[int, int | None] = (1, None)
) -> tuple[float, float]:
    """α-ReQ: power-law decay exponent α of the eigenspectrum, λ_i ∝ i^−α (Agrawal et al. 2022).

    Least-squares fit of log λ_i = c − α log i over 1-based indices i ∈ [start, stop] (inclusive)
    of the descending spectrum; returns (α, R²) with R² = 1 − SS_res / SS_tot of that fit
    (1.0 when SS_tot = 0, i.e. a perfectly flat fitted segment). α > 0 for decaying spectra.

    Index range: ``fit_range = (start, stop)``. Only eigenvalues λ_i > 1e-12 · λ_max are usable;
    let r be their count and n = len(eig). ``stop=None`` means stop = min(r, max(2, ⌊n/2⌋)):
    the top half of the spectrum, because the tail of a finite-sample covariance spectrum is
    bent down by sampling noise (Marchenko–Pastur edge) and floating-point error. An explicit
    stop is clipped to r. Fewer than two usable points → (NaN, NaN).
    """
    start, stop = fit_range
    if start < 1 or (stop is not None and stop < start):
        raise ValueError(
            f"fit_range must be 1-based (start, stop) with start ≤ stop, got {fit_range}"
        )
    lam = _as_spectrum(eig, "eig")
    if lam[0] <= 0.0:
        return float("nan"), float("nan")
    r = int(np.sum(lam > ALPHA_REQ_REL_FLOOR * lam[0]))
    stop = min(r, max(2, lam.size // 2)) if stop is None else min(stop, r)
    if stop - start + 1 < 2:
        return float("nan"), float("nan")
    idx = np.arange(start, stop + 1, dtype=np.float64)
    x = np.log(idx)
    y = np.log(lam[start - 1 : stop])
    xc = x - x.mean()
    yc = y - y.mean()
    slope = float(np.dot(xc, yc) / np.dot(xc, xc))
    ss_tot = float(np.dot(yc, yc))
    ss_res = float(np.sum((yc - slope * xc) ** 2))
    r2 = 1.0 if ss_tot == 0.0 else 1.0 - ss_res / ss_tot
    return -slope, r2


def alpha_req(X: Any, fit_range: tuple[int, int | None] = (1, None)) -> tuple[float, float]:
    """α-ReQ (Agrawal et al. 2022) of the covariance spectrum of X (N × d); returns (α, R²).

    Uses the d covariance eigenvalues (zeros included in n = d for the default range); see
    :func:`alpha_req_from_eigenvalues` for the fit and the documented index range.
    """
    return alpha_req_from_eigenvalues(covariance_eigenvalues(X), fit_range=fit_range)


def eigenvalues_from_covariance(cov: Any, n_samples: int | None = None) -> np.ndarray:
    """Eigenvalues of a symmetric covariance matrix (d × d), descending, clipped at 0.

    The matrix is symmetrised, (C + Cᵀ)/2, then ``numpy.linalg.eigvalsh`` (float64) is used.
    With ``n_samples`` = n, the covariance of n samples (or of n distinct rows) has rank
    ≤ n − 1, so λ_i for i ≥ n − 1 (descending, 0-based) are exact zeros and are set to 0: the
    float32 rounding of the probe's streamed sums leaves noise of ~1e-8–1e-7 λ_max there, which
    the effective rank (a function of √λ) would count as spectrum (+0.3–0.8 % on a 153-token
    SmolLM2 probe), and which bends the α-ReQ fit once the noise is inside its range.

    Why not a float32 solver, although it is 1.6–1.7× faster (12 vs 20 ms at d = 576, one
    core) and the sums are float32: their error is graded (each entry's error scales with its
    own coordinates' magnitudes), while a float32 solver's error is ~eps₃₂ · λ_max on every
    eigenvalue. With a rogue coordinate 300× the bulk that moves the effective rank by 4e-4;
    models with stronger massive activations than SmolLM2 (where it moved ≤ 5e-7) would lose
    their bulk spectrum (``tests/test_metrics.py``).
    """
    c = as_numpy(cov)
    if c.ndim != 2 or c.shape[0] != c.shape[1] or c.shape[0] < 1:
        raise ValueError(f"cov must be a square d × d matrix, got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("cov contains NaN or infinite values")
    eig = np.clip(np.linalg.eigvalsh(0.5 * (c + c.T))[::-1], 0.0, None)
    if n_samples is not None:
        eig[max(int(n_samples) - 1, 0) :] = 0.0
    return eig


def spectral_metrics_from_eigenvalues(eig: Any) -> dict[str, float]:
    """Every spectral metric the probe stores, from one layer's covariance eigenvalues λ.

    ``effective_rank`` and ``stable_rank`` of σ = √λ (Roy & Vetterli 2007 with the RankMe ε;
    Rudelson & Vershynin 2007), ``participation_ratio`` (Σλ)²/Σλ² (Gao et al. 2017),
    ``alpha_req`` / ``alpha_req_r2`` (Agrawal et al. 2022) and ``top_pc_share`` λ_max/Σλ. The
    one place that maps a spectrum to these numbers (the probe and ``bench probe``'s peers).
    """
    lam = as_numpy(eig)
    sv = np.sqrt(np.clip(lam, 0.0, None))
    alpha, r2 = alpha_req_from_eigenvalues(lam)
    return {
        "effective_rank": effective_rank_from_singular_values(sv),
        "stable_rank": stable_rank_from_singular_values(sv),
        "participation_ratio": participation_ratio_from_eigenvalues(lam),
        "alpha_req": alpha,
        "alpha_req_r2": r2,
        "top_pc_share": top_pc_share_from_eigenvalues(lam),
    }


def covariance_from_moments(n: int, sum_x: Any, sum_xxT: Any, shift: Any = None) -> np.ndarray:
    """Unbiased covariance from streaming sums of shifted data y = x − shift.

    Given n, Σ y (d,) and Σ y yᵀ (d × d) accumulated over all rows, returns
    C = (Σ y yᵀ − (Σ y)(Σ y)ᵀ / n) / (n − 1), which equals the covariance of x because a constant
    shift does not change it (the "shifted data" algorithm; Chan, Golub & LeVeque 1983). Choose
    the shift close to the data mean (e.g. the first batch's mean) to avoid catastrophic
    cancellation when |mean| ≫ std. ``shift`` is accepted only for validation and documentation:
    the sums must already be of x − shift (None means zeros, i.e. raw sums).
    """
    if int(n) != n or n < 2:
        raise ValueError(f"covariance needs n ≥ 2 rows, got n={n}")
    s = as_numpy(sum_x)
    ss = as_numpy(sum_xxT)
    if s.ndim != 1 or ss.shape != (s.size, s.size):
        raise ValueError(f"sum_x must be (d,) and sum_xxT (d, d), got {s.shape} and {ss.shape}")
    if shift is not None and as_numpy(shift).shape != s.shape:
        raise ValueError(f"shift must have shape {s.shape}, got {as_numpy(shift).shape}")
    cov = (ss - np.outer(s, s) / n) / (n - 1)
    return 0.5 * (cov + cov.T)


def batch_moments(X: Any, shift: Any = None) -> tuple[int, np.ndarray, np.ndarray]:
    """Moments of one batch for streaming covariance: (n, Σ y, Σ y yᵀ) with y = x − shift.

    Add these over batches and pass the totals to :func:`covariance_from_moments`.
    """
    arr = _as_matrix(X, min_rows=1)
    if shift is not None:
        sh = as_numpy(shift)
        if sh.shape != (arr.shape[1],):
            raise ValueError(f"shift must have shape ({arr.shape[1]},), got {sh.shape}")
        arr = arr - sh
    return arr.shape[0], arr.sum(axis=0), arr.T @ arr


def mean_from_moments(n: int, sum_x: Any, shift: Any = None) -> np.ndarray:
    """Mean of x from streaming sums of y = x − shift: shift + Σ y / n."""
    if int(n) != n or n < 1:
        raise ValueError(f"mean needs n ≥ 1 rows, got n={n}")
    s = as_numpy(sum_x)
    if s.ndim != 1:
        raise ValueError(f"sum_x must be 1-D (d,), got shape {s.shape}")
    return s / n if shift is None else as_numpy(shift) + s / n
