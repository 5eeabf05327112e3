"""Intervals of the evaluation scores (collapse_core.eval_intervals): against scipy's Wilson
interval, the pinned ECE/MCE, and coverage on simulated items with a known true value."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from collapse_core import eval_intervals as I
from collapse_core import metrics as M


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (81, 263), (50, 50), (1, 2)])
def test_wilson_interval_matches_scipy(k, n):
    ref = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = I.wilson_interval(k, n)
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


def test_rate_estimate_counts_items_and_refuses_nothing_to_count():
    est = I.rate_estimate([True, False, True, True])
    assert (est.value, est.n, est.ci_method) == (0.75, 4, I.METHOD_WILSON)
    assert est.ci_low < 0.75 < est.ci_high
    empty = I.rate_estimate([])
    assert empty.n == 0 and math.isnan(empty.value) and empty.ci_low is None
    with pytest.raises(ValueError, match="successes"):
        I.wilson_interval(5, 4)


def test_calibration_estimates_reproduce_the_pinned_ece_and_mce():
    rng = np.random.default_rng(0)
    conf = np.concatenate([[0.0, 1.0, 1 / 15, 2 / 15], rng.uniform(0.2, 1.0, 196)])  # bin edges
    corr = (rng.uniform(size=conf.size) < conf).astype(float)
    est = I.calibration_estimates(conf, corr)
    assert est["ece"].value == pytest.approx(M.expected_calibration_error(conf, corr), abs=1e-12)
    assert est["mce"].value == pytest.approx(M.maximum_calibration_error(conf, corr), abs=1e-12)
    assert 0.0 <= est["ece"].ci_low <= est["ece"].value <= est["ece"].ci_high <= 1.0
    assert est["ece"].n == est["mce"].n == 200
    assert est["mce"].ci_low is None and est["mce"].ci_method is None  # a max: no bootstrap CI


def test_ece_interval_covers_the_true_miscalibration():
    """Items whose accuracy is their confidence − 0.15: the population ECE is 0.15. The basic
    interval undoes the small-sample upward bias of binned ECE; a percentile interval of
    these replicates covers 0.15 far less often."""
    hits, n_sim = 0, 120
    for r in range(n_sim):
        rng = np.random.default_rng(1000 + r)
        conf = rng.uniform(0.4, 0.95, 150)
        corr = (rng.uniform(size=150) < conf - 0.15).astype(float)
        est = I.calibration_estimates(conf, corr, seed=r)["ece"]
        hits += est.ci_low <= 0.15 <= est.ci_high
    assert hits / n_sim >= 0.85


def test_mean_and_ratio_intervals_cover_and_shrink_with_items():
    hits = 0
    for r in range(150):
        x = np.random.default_rng(r).normal(2.0, 1.0, 60)
        est = I.mean_estimate(x, seed=r)
        assert est.value == pytest.approx(x.mean())
        hits += est.ci_low <= 2.0 <= est.ci_high
    assert hits / 150 >= 0.88
    rng = np.random.default_rng(7)
    small = I.ratio_estimate(rng.exponential(size=20) * 5, np.full(20, 5))
    large = I.ratio_estimate(rng.exponential(size=2000) * 5, np.full(2000, 5))
    assert (small.ci_high - small.ci_low) > 5 * (large.ci_high - large.ci_low)
    num, den = np.array([3.0, 1.0, 8.0]), np.array([1, 0, 4])
    assert I.ratio_estimate(num, den).value == pytest.approx(12 / 5)  # token-weighted
    with pytest.raises(ValueError, match="differ in shape"):
        I.ratio_estimate(num, den[:2])


def test_one_item_has_no_interval_and_formatting():
    one = I.mean_estimate([0.3])
    assert one.n == 1 and one.ci_low is None and one.ci_method is None
    assert I.format_estimate(0.4123, 0.31, 0.52) == "0.412 [0.310, 0.520]"
    assert I.format_estimate(0.4123, None, None) == "0.412"
    assert I.format_estimate(float("nan"), 0.1, 0.2) == ""


def test_ece_interval_of_a_calibrated_model_holds_its_value():
    """Calibrated items: binned ECE is all small-n bias, every replicate lies above θ̂ and the
    reflected upper end alone would fall below it (11–17 % of draws before the end was set
    to θ̂). The interval must still hold the stored value, inside [0, 1]."""
    for r in range(40):
        rng = np.random.default_rng(2000 + r)
        conf = rng.uniform(0.4, 0.95, 48)
        corr = (rng.uniform(size=48) < conf).astype(float)
        est = I.calibration_estimates(conf, corr, seed=r)["ece"]
        assert 0.0 <= est.ci_low <= est.value <= est.ci_high <= 1.0, (r, est)


def test_loss_intervals_stay_in_the_scores_range():
    """One outlier among near-zero losses: the reflected lower end goes below 0 (it read
    0.422 [-0.322, 0.794]); a loss is clipped at 0, Brier to [0, 2]. Refusal margins (no
    bounds) keep the reflected interval."""
    losses = np.array([0.05] * 15 + [6.0])
    free = I.mean_estimate(losses)
    assert free.ci_low < 0  # the case the bounds are for
    clipped = I.mean_estimate(losses, bounds=I.NON_NEGATIVE)
    assert clipped.ci_low == 0.0 and clipped.ci_high == pytest.approx(free.ci_high)
    ratio = I.ratio_estimate(losses * 4, np.full(16, 4.0), bounds=I.NON_NEGATIVE)
    assert ratio.ci_low >= 0.0 and ratio.value == pytest.approx(losses.mean())
    brier = I.mean_estimate(np.array([1.95] * 15 + [0.0]), bounds=I.BRIER_RANGE)
    assert 0.0 <= brier.ci_low <= brier.value <= brier.ci_high <= 2.0
