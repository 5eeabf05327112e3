"""Pure metric functions for representation collapse (one family per module).

Every function accepts numpy arrays or torch tensors, computes in float64 and returns Python
floats (or numpy arrays / tuples / dicts where documented). Formulas and sources are pinned in
each docstring and in DESIGN.md "Metrics".

``METRIC_CODE_VERSION`` is part of the probe's cache key: bump it whenever any formula or
convention here changes, so cached results computed with the old formula are not reused.
"""

from __future__ import annotations

from .calibration import (
    bin_index,
    brier_score,
    expected_calibration_error,
    maximum_calibration_error,
    reliability_bins,
)
from .geometry import (
    anisotropy_cosine,
    anisotropy_cosine_from_sums,
    homogeneity,
    homogeneity_from_sums,
    linear_cka,
    nc1,
    twonn_dimension,
    unit_rows,
)
from .logits import (
    entropy_from_logits,
    entropy_from_logits_torch,
    top1_margin_from_logits,
    top1_margin_from_logits_torch,
)
from .robust import (
    ROBUST_METRICS,
    ROGUE_K,
    centred_cosine_anisotropy,
    robust_companions,
    rogue_dimensions,
    spectral_without_rogue,
)
from .spectral import (
    RANKME_EPS,
    alpha_req,
    alpha_req_from_eigenvalues,
    as_numpy,
    batch_moments,
    covariance_eigenvalues,
    covariance_from_moments,
    effective_rank,
    effective_rank_from_eigenvalues,
    effective_rank_from_singular_values,
    eigenvalues_from_covariance,
    mean_from_moments,
    participation_ratio,
    participation_ratio_from_eigenvalues,
    singular_values,
    spectral_metrics_from_eigenvalues,
    stable_rank,
    stable_rank_from_eigenvalues,
    stable_rank_from_singular_values,
    top_pc_share,
    top_pc_share_from_eigenvalues,
)
from .subspace import (
    intruder_dimensions,
    orthonormal_basis,
    principal_angles,
    subspace_overlap,
    top_singular_subspace,
    update_spectrum_metrics,
)
from .units import dormant_fraction, dormant_fraction_from_mean_abs, unit_scores_from_mean_abs

#: Bump when any metric formula or convention changes (part of the probe cache key).
METRIC_CODE_VERSION = "3"  # 2: robust companions (metrics/robust.py); 3: the probe's covariance
# spectra bounded to rank n − 1, layer 0's to (distinct rows − 1) (eigenvalues_from_covariance)

__all__ = [
    "METRIC_CODE_VERSION",
    "RANKME_EPS",
    "ROBUST_METRICS",
    "ROGUE_K",
    "alpha_req",
    "alpha_req_from_eigenvalues",
    "anisotropy_cosine",
    "anisotropy_cosine_from_sums",
    "bin_index",
    "as_numpy",
    "batch_moments",
    "brier_score",
    "centred_cosine_anisotropy",
    "covariance_eigenvalues",
    "covariance_from_moments",
    "dormant_fraction",
    "dormant_fraction_from_mean_abs",
    "effective_rank",
    "effective_rank_from_eigenvalues",
    "effective_rank_from_singular_values",
    "eigenvalues_from_covariance",
    "entropy_from_logits",
    "entropy_from_logits_torch",
    "expected_calibration_error",
    "homogeneity",
    "homogeneity_from_sums",
    "intruder_dimensions",
    "linear_cka",
    "maximum_calibration_error",
    "mean_from_moments",
    "nc1",
    "orthonormal_basis",
    "participation_ratio",
    "participation_ratio_from_eigenvalues",
    "principal_angles",
    "reliability_bins",
    "robust_companions",
    "rogue_dimensions",
    "singular_values",
    "spectral_metrics_from_eigenvalues",
    "spectral_without_rogue",
    "stable_rank",
    "stable_rank_from_eigenvalues",
    "stable_rank_from_singular_values",
    "subspace_overlap",
    "top1_margin_from_logits",
    "top1_margin_from_logits_torch",
    "top_pc_share",
    "top_pc_share_from_eigenvalues",
    "top_singular_subspace",
    "twonn_dimension",
    "unit_rows",
    "unit_scores_from_mean_abs",
    "update_spectrum_metrics",
]
