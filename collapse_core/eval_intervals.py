"""95 % intervals of the evaluation scores: what an ``evals`` row's ``n``, ``ci_low``, ``ci_high``
and ``ci_method`` mean.

An eval scores ``n`` items (questions, pairs, prompts, problems) once each, so its sampling noise
is that of the item draw: a second draw of ``n`` items from the same source would move the
score by about the interval's half-width. Two rules, one per kind of score:

- a **rate** (accuracy, pass@1, refusal rate) of ``k`` successes in ``n`` independent items gets
  the Wilson score interval (Wilson 1927; recommended over the Wald interval for small ``n`` and
  rates near 0 or 1 by Brown, Cai & DasGupta 2001, *Statist. Sci.* 16:101):
  centre (p̂ + z²/2n) / (1 + z²/n), half-width z/(1 + z²/n) · √(p̂(1 − p̂)/n + z²/4n²);
- any other score (ECE, Brier, NLL, token-weighted held-out loss, mean refusal margin)
  gets the *basic* bootstrap interval over items (Davison & Hinkley 1997, eq. 5.6):
  B replicates draw the ``n`` items with replacement, θ*_b is the score of replicate b, and
  [2θ̂ − q₉₇.₅(θ*), 2θ̂ − q₂.₅(θ*)] clipped to the score's range (≥ 0 for losses, [0, 2]
  for Brier, [0, 1] for ECE; refusal margins are unbounded), and an end that the reflection
  carries past θ̂ set to θ̂, so the interval always holds its value. The reflection matters
  for ECE/MCE: binned calibration error is biased upwards at small ``n`` (every bin's
  |accuracy − confidence| is inflated by its noise) and a replicate, which repeats items, is
  more so; the percentile interval would sit above θ̂ and could exclude it. For a model that
  is (nearly) calibrated the bias is the whole value: every replicate lies above θ̂, the
  reflected upper end falls below θ̂ and is set to it, and the interval covers the true ECE
  poorly: on simulated items (100 draws each, confidences uniform in [0.4, 0.95]) it holds
  a true ECE of 0 in 47 % of draws at n = 48, 53 % at n = 200 and 59 % at n = 1000; a true
  ECE of 0.05 at n = 48 in 80 %, and 0.15 at n = 150 in 91 %. Read an ECE interval as the
  item-draw noise of a miscalibration well above its small-``n`` bias, not as a test of
  "ECE = 0".

Scores with no interval (``ci_method`` NULL): MCE (a maximum over bins, set by the sparsest
bin: the bootstrap of a maximum is inconsistent, Bickel & Freedman 1981, and on real SmolLM2
at n = 48 it gave [0.670, 0.994] around 0.670, i.e. no information), the plasticity AUC and
final loss (one short training run, not a sample of items; its spread is the seed-to-seed
spread of the Hypothesis page) and the count of timed-out programs. This module is torch-free and pure: arrays in,
numbers out.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
#: Bootstrap replicates per eval score (the item counts are 16–512: 2000 replicates keep the
#: Monte-Carlo error of a 2.5 % quantile well under the interval's width, in milliseconds).
N_BOOT = 2000
METHOD_WILSON = "Wilson score interval over items"
METHOD_ITEM_BOOTSTRAP = "item bootstrap, basic interval"


@dataclass(frozen=True)
class Estimate:
    """A score with its item count and 95 % interval (``ci_method`` None: no interval)."""

    value: float
    n: int
    ci_low: float | None = None
    ci_high: float | None = None
    ci_method: str | None = None


def _z(level: float) -> float:
    from scipy.stats import norm

    return float(norm.ppf(0.5 + level / 2))


def wilson_interval(successes: int, n: int, level: float = LEVEL) -> tuple[float, float]:
    """Wilson score interval of a binomial rate k/n (Wilson 1927; Brown, Cai & DasGupta 2001):
    (p̂ + z²/2n ± z √(p̂(1 − p̂)/n + z²/4n²)) / (1 + z²/n). ``n = 0`` → (NaN, NaN)."""
    if n <= 0:
        return float("nan"), float("nan")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def rate_estimate(outcomes: np.ndarray | list[bool], level: float = LEVEL) -> Estimate:
    """The rate of true ``outcomes`` (one per item) with its Wilson interval; no items → NaN."""
    arr = np.asarray(outcomes, dtype=bool).ravel()
    n = int(arr.size)
    if n == 0:
        return Estimate(float("nan"), 0)
    k = int(arr.sum())
    lo, hi = wilson_interval(k, n, level)
    return Estimate(k / n, n, lo, hi, METHOD_WILSON)


def item_bootstrap(
    statistic: Callable[[np.ndarray], np.ndarray],
    n: int,
    bounds: tuple[float, float] = (-math.inf, math.inf),
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> Estimate:
    """A score over ``n`` items with its basic bootstrap interval [2θ̂ − q_hi, 2θ̂ − q_lo]
    (Davison & Hinkley 1997, eq. 5.6), clipped to ``bounds`` and widened to hold θ̂ (an end
    the reflection carries past θ̂, as for a biased score whose replicates all lie on one side
    of it, is set to θ̂: an interval that excludes its own value is no interval of it).

    ``statistic(weights)`` takes a (B, n) array of item multiplicities and returns the B scores
    (vectorised: every eval score here is a weighted sum or a ratio of weighted sums); θ̂ is its
    value at weight 1 per item, the replicates its values at ``n_boot`` multinomial draws of
    ``n`` items (= resampling the items with replacement). Fewer than 2 items, or a non-finite
    score, → no interval."""
    if n <= 0:
        return Estimate(float("nan"), 0)
    value = float(statistic(np.ones((1, n)))[0])
    if n < 2 or not math.isfinite(value):
        return Estimate(value, n)
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)
    reps = np.asarray(statistic(weights), dtype=float)
    reps = reps[np.isfinite(reps)]
    if reps.size < n_boot // 2:  # most replicates undefined: no honest interval
        return Estimate(value, n)
    q_lo, q_hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    lo = min(float(np.clip(2 * value - q_hi, *bounds)), value)
    hi = max(float(np.clip(2 * value - q_lo, *bounds)), value)
    return Estimate(value, n, lo, hi, METHOD_ITEM_BOOTSTRAP)


#: Range of a score that cannot be negative (NLL, log-loss, a token-weighted loss).
NON_NEGATIVE = (0.0, math.inf)
#: Range of the multi-class Brier score Σ_k (p_k − y_k)².
BRIER_RANGE = (0.0, 2.0)


def mean_estimate(
    values: np.ndarray | list[float],
    seed: int = 0,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> Estimate:
    """The mean of per-item ``values`` (NaNs dropped) with its item-bootstrap interval,
    clipped to the score's ``bounds`` (e.g. :data:`NON_NEGATIVE` for a loss)."""
    arr = np.asarray(values, dtype=float).ravel()
    arr = arr[np.isfinite(arr)]
    return item_bootstrap(lambda w: w @ arr / w.sum(axis=1), int(arr.size), bounds, seed=seed)


def ratio_estimate(
    numerators: np.ndarray,
    denominators: np.ndarray,
    seed: int = 0,
    bounds: tuple[float, float] = (-math.inf, math.inf),
) -> Estimate:
    """Σ numerators / Σ denominators over items (e.g. a token-weighted loss: Σ NLL / Σ tokens)
    with its item-bootstrap interval clipped to ``bounds``; items with a zero denominator still
    count as items."""
    num = np.asarray(numerators, dtype=float).ravel()
    den = np.asarray(denominators, dtype=float).ravel()
    if num.shape != den.shape:
        raise ValueError(f"numerators {num.shape} and denominators {den.shape} differ in shape")

    def ratio(w: np.ndarray) -> np.ndarray:
        total = w @ den
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(total > 0, (w @ num) / np.where(total > 0, total, 1.0), np.nan)

    return item_bootstrap(ratio, int(num.size), bounds, seed=seed)


def calibration_estimates(
    confidences: np.ndarray, correct: np.ndarray, n_bins: int = 15, seed: int = 0
) -> dict[str, Estimate]:
    """ECE (Guo et al. 2017, eq. 3, the pinned bins of :func:`collapse_core.metrics.bin_index`)
    with its item-bootstrap interval in [0, 1], and MCE (eq. 5) without one (see the module
    docstring: a maximum over bins has no consistent bootstrap).

    ECE = Σ_b |Σ_{i∈b} w_i (a_i − c_i)| / Σ_i w_i for multiplicities w (w = 1: the stored
    value); MCE = max_b |Σ_{i∈b} (a_i − c_i)| / n_b over non-empty bins."""
    from .metrics import bin_index

    conf = np.asarray(confidences, dtype=float).ravel()
    corr = np.asarray(correct, dtype=float).ravel()
    n = int(conf.size)
    onehot = np.zeros((n, int(n_bins)))
    onehot[np.arange(n), bin_index(conf, n_bins)] = 1.0
    gap = onehot * (corr - conf)[:, None]  # (n, bins): signed accuracy − confidence per item

    def ece(w: np.ndarray) -> np.ndarray:
        return np.abs(w @ gap).sum(axis=1) / w.sum(axis=1)

    count = onehot.sum(axis=0)
    per_bin = np.abs(gap.sum(axis=0))[count > 0] / count[count > 0]
    mce = float(per_bin.max()) if per_bin.size else float("nan")
    return {"ece": item_bootstrap(ece, n, (0.0, 1.0), seed=seed), "mce": Estimate(mce, n)}


def format_estimate(value: float, lo: float | None, hi: float | None, digits: int = 3) -> str:
    """``"0.412 [0.318, 0.512]"``; the bare value where there is no interval; ``""`` for NaN."""
    if value is None or not math.isfinite(float(value)):
        return ""
    text = f"{float(value):.{digits}f}"
    if lo is None or hi is None or not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
        return text
    return f"{text} [{float(lo):.{digits}f}, {float(hi):.{digits}f}]"
