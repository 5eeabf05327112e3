"""Geometry of the weight updates ΔW across the stages of a chain, LoRA or full fine-tuning.

Input: ``stage_deltas = {stage: {module: ΔW}}`` in chain order (dict insertion order) with every
ΔW as an (out × in) array: ΔW = scaling · B A for a LoRA stage
(:func:`collapse_core.train.lora.delta_weight`), ΔW = W_after − W_before for a full fine-tuning
stage (:func:`collapse_core.train.full.weight_deltas`), and ``base_weights =
{module: W}`` in the same orientation (:func:`collapse_core.train.lora.module_weight`).

Rows (long format, the ``lora_metrics`` table): ``{stage, module, metric, other_stage, value}``.

Per (stage, module), ``other_stage`` None:

- ``effective_rank``, ``stable_rank``, ``frobenius_norm``, ``spectral_norm`` of ΔW's
  (uncentred) singular values: :func:`collapse_core.metrics.update_spectrum_metrics`;
- ``update_rank``: numerical rank r of ΔW (σ > σ_max · max(out, in) · eps, eps of the input
  dtype; ≤ the LoRA rank, typically min(out, in) for full fine-tuning);
- ``relative_update_norm``: ‖ΔW‖_F / ‖W_start‖_F;
- ``intruder_dimensions``: of W_start + ΔW against W_start, the stage's own starting weights
  (Shuttleworth et al. 2024; top k = min(10, out, in) singular vectors, cosine threshold 0.5:
  :func:`collapse_core.metrics.intruder_dimensions`), and ``intruder_dimensions_cumulative``
  against the chain start.

Per (stage, module, earlier stage) with ``other_stage`` = the earlier stage, on the top-r left
singular subspaces U (out × r) of the two updates (the output directions each stage writes to;
r = min(update_rank, ``max_rank``), so a full-rank full-FT ΔW is compared on its top
``max_rank`` directions rather than on the whole space, which would overlap trivially):

- ``principal_angle_mean`` / ``principal_angle_min`` (radians; θ_i = arccos σ_i(U₁ᵀU₂));
- ``subspace_overlap`` = ‖U₁ᵀU₂‖_F² / min(r₁, r₂) (1 = one subspace contains the other,
  0 = orthogonal; ≈ r/out for random subspaces).

Starting weights are reconstructed: merged weights after stage t are W + ΔW_t, so with
``base_after = b`` (``base_weights`` taken after the first b stages of ``stage_deltas`` were
merged; 0 = the chain start) the chain start is W_base − Σ_{t<b} ΔW_t and stage s starts from
chain start + Σ_{t<s} ΔW_t. Interventions that edit weights between stages (refresh,
shrink-and-perturb) make this approximate.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["left_singular_subspace", "lora_update_metrics"]

_EPS = float(np.finfo(np.float64).eps)
#: Intruder dimensions: how many top singular vectors of the tuned weight are checked.
INTRUDER_TOP_K = 10


def _eps_of(array: Any) -> float:
    """Machine epsilon of an array's float dtype (float64 for anything else)."""
    dtype = getattr(array, "dtype", None)
    try:
        return float(np.finfo(np.dtype(str(dtype).replace("torch.", ""))).eps)
    except (TypeError, ValueError):
        return _EPS


def left_singular_subspace(delta: Any, eps: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(U_r, σ): orthonormal basis (out × r) of ΔW's column space and all singular values.

    r = numerical rank, σ_i > σ_max · max(shape) · eps (the ``numpy.linalg.matrix_rank`` rule)
    with eps of the input's dtype: a ΔW = B A computed in float32 has rounding noise ~1e-7·σ_max
    in every direction, which float64's eps would count as rank.
    """
    eps = _eps_of(delta) if eps is None else eps
    arr = np.asarray(delta, dtype=np.float64)
    u, s, _ = np.linalg.svd(arr, full_matrices=False)
    if s.size == 0 or s[0] <= 0.0:
        return u[:, :0], s
    r = int(np.sum(s > s[0] * max(arr.shape) * eps))
    return u[:, :r], s


_SUBSPACE_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _cached_subspace(stage: str, module: str, delta: np.ndarray, eps: float):
    """left_singular_subspace memoised by content: a pipeline asks again for every earlier
    stage at every later stage, and each is a full SVD."""
    key = (stage, module, delta.shape, hashlib.sha1(delta.tobytes()).hexdigest(), eps)
    if key not in _SUBSPACE_CACHE:
        if len(_SUBSPACE_CACHE) > 4096:
            _SUBSPACE_CACHE.clear()
        _SUBSPACE_CACHE[key] = left_singular_subspace(delta, eps)
    return _SUBSPACE_CACHE[key]


def lora_update_metrics(
    stage_deltas: Mapping[str, Mapping[str, Any]],
    base_weights: Mapping[str, Any],
    base_after: int = 0,
    only_stage: str | None = None,
    max_rank: int | None = None,
) -> list[dict[str, Any]]:
    """Spectra of every stage's ΔW and its subspace geometry against earlier stages' updates.

    See the module docstring for the rows, definitions and the weight reconstruction. Modules
    missing from ``base_weights`` get no intruder/relative-norm rows; pairs of stages are
    compared only on modules both adapted. ``only_stage`` emits (and computes) only that
    stage's rows; earlier stages then contribute just their cached subspaces. ``max_rank``
    caps the rank of the compared subspaces (None: the numerical rank).
    """
    from .. import metrics as M

    stages = list(stage_deltas)
    eps = {(s, m): _eps_of(d) for s in stages for m, d in stage_deltas[s].items()}
    deltas = {s: {m: np.asarray(d, dtype=np.float64) for m, d in stage_deltas[s].items()}
              for s in stages}  # fmt: skip
    chain_start: dict[str, np.ndarray] = {}
    for module, weight in base_weights.items():
        w = np.asarray(weight, dtype=np.float64).copy()
        for earlier in stages[:base_after]:
            if module in deltas[earlier]:
                w -= deltas[earlier][module]
        chain_start[module] = w
    rows: list[dict[str, Any]] = []

    def add(stage: str, module: str, metric: str, value: float, other: str | None = None) -> None:
        rows.append({"stage": stage, "module": module, "metric": metric,
                     "other_stage": other, "value": float(value)})  # fmt: skip

    subspaces: dict[str, dict[str, np.ndarray]] = {}
    running = {m: w.copy() for m, w in chain_start.items()}  # weights at the start of `stage`
    for index, stage in enumerate(stages):
        subspaces[stage] = {}
        for module, delta in deltas[stage].items():
            u, _ = _cached_subspace(stage, module, delta, eps[(stage, module)])
            rank = u.shape[1]
            if max_rank is not None:
                u = u[:, :max_rank]
            subspaces[stage][module] = u
            if only_stage is not None and stage != only_stage:
                continue
            for name, value in M.update_spectrum_metrics(delta).items():
                add(stage, module, name, value)
            add(stage, module, "update_rank", rank)
            start = running.get(module)
            if start is not None and start.shape == delta.shape:
                norm = np.linalg.norm(start)
                add(stage, module, "relative_update_norm",
                    np.linalg.norm(delta) / norm if norm > 0 else float("nan"))  # fmt: skip
                tuned = start + delta
                k = min(INTRUDER_TOP_K, *delta.shape)
                add(stage, module, "intruder_dimensions", M.intruder_dimensions(start, tuned, k=k))
                add(stage, module, "intruder_dimensions_cumulative",
                    M.intruder_dimensions(chain_start[module], tuned, k=k))  # fmt: skip
            for earlier in stages[:index]:
                u_prev = subspaces[earlier].get(module)
                if u_prev is None or u_prev.shape[0] != u.shape[0]:
                    continue
                if u.shape[1] == 0 or u_prev.shape[1] == 0:
                    continue
                angles = np.asarray(M.principal_angles(u, u_prev), dtype=np.float64)
                add(stage, module, "principal_angle_mean", angles.mean(), earlier)
                add(stage, module, "principal_angle_min", angles.min(), earlier)
                add(stage, module, "subspace_overlap", M.subspace_overlap(u, u_prev), earlier)
        for module, delta in deltas[stage].items():
            if module in running and running[module].shape == delta.shape:
                running[module] = running[module] + delta
    return rows
