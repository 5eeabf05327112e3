"""The logit lens's adaptive two-phase design (collapse_core.lens) and its bootstrap."""

from __future__ import annotations

import numpy as np
import pytest

from collapse_core.lens import (
    MIN_EXACT,
    lens_design,
    lens_estimate,
    lens_sample_index,
    predicted_variance_ratio,
    proxy_vocab,
)
from collapse_core.uncertainty import subsample_metrics


def test_lens_design_nests_the_exact_rows_in_the_lens_and_the_proxy():
    design = lens_design(512, 64)
    np.testing.assert_array_equal(design.lens, lens_sample_index(512, 64))
    assert design.two_phase and len(design.exact) == 24
    assert set(design.exact) <= set(design.lens) and set(design.exact) <= set(design.proxy)
    assert len(design.proxy) >= 128 and design.proxy.max() == 511
    assert proxy_vocab(49152) == 2048 and proxy_vocab(10) == 1


def test_small_lenses_and_subsamples_keep_the_exact_lens():
    small = lens_design(512, 16)  # m = 6 < MIN_EXACT: the variance test would be noise
    assert not small.two_phase and len(small.exact) == 16 and 6 < MIN_EXACT
    tight = lens_design(64, 64)  # no tokens beyond the lens for the proxy
    assert not tight.two_phase and len(tight.lens) == 64
    assert len(lens_design(512, 0).lens) == 0


def test_lens_estimate_is_the_difference_estimator_and_the_plain_mean_without_proxy():
    rng = np.random.default_rng(0)
    design = lens_design(256, 32)
    y_all = rng.normal(5.0, 1.0, 256)
    x_all = 0.8 * y_all + rng.normal(0, 0.2, 256)
    exact = np.full(256, np.nan)
    proxy = np.full(256, np.nan)
    exact[design.exact], proxy[design.proxy] = y_all[design.exact], x_all[design.proxy]
    expected = y_all[design.exact].mean() + x_all[design.proxy].mean() - x_all[design.exact].mean()
    assert lens_estimate(exact, proxy) == pytest.approx(expected, abs=1e-12)
    assert lens_estimate(exact, None) == pytest.approx(y_all[design.exact].mean())
    assert lens_estimate(exact, np.full(256, np.nan)) == pytest.approx(y_all[design.exact].mean())
    # weights are multiplicities: weight 2 on a row is that row twice
    w = np.ones(256)
    w[design.exact[0]] = 2.0
    doubled = np.append(design.exact, design.exact[0])
    proxy_rows = np.append(design.proxy, design.exact[0])
    expected = y_all[doubled].mean() + x_all[proxy_rows].mean() - x_all[doubled].mean()
    assert lens_estimate(exact, proxy, w) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(lens_estimate(exact, proxy, np.zeros(256)))


def test_the_bootstrap_resamples_the_two_phase_estimate():
    """subsample_metrics takes a 2 × rows (exact, proxy) entry and returns its two-phase
    estimate under the replicate's weights."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6))
    exact = np.full(40, np.nan)
    proxy = rng.normal(3.0, 1.0, 40)
    exact[::4] = proxy[::4] + 0.5
    w = rng.integers(0, 3, 40).astype(float)
    w[0] = 1.0
    got = subsample_metrics(x, w, token_values={"logit_lens_entropy": np.stack([exact, proxy])})
    assert got["logit_lens_entropy"] == pytest.approx(lens_estimate(exact, proxy, w))
    # the proxy is the exact value less 0.5 everywhere: the estimate is the proxy mean + 0.5
    has = w > 0
    assert got["logit_lens_entropy"] == pytest.approx(
        np.dot(w[has], proxy[has]) / w[has].sum() + 0.5
    )


def test_predicted_variance_ratio_is_cochrans_double_sampling_variance():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(24, 1))
    x = y + rng.normal(0, 0.3, size=(24, 1))
    s_y, s_d = y.var(ddof=1), (y - x).var(ddof=1)
    expected = (s_y / 128 + s_d * (1 / 24 - 1 / 128)) / (s_y / 64)
    assert predicted_variance_ratio(y, x, 128, 64)[0] == pytest.approx(expected)


def test_topped_up_layers_are_those_the_proxy_cannot_help():
    design = lens_design(512, 64)
    rng = np.random.default_rng(4)
    y = rng.normal(4.0, 1.5, size=(24, 2))
    x = np.column_stack([y[:, 0] - 2.0, rng.normal(size=24)])  # layer 1's proxy is noise
    np.testing.assert_array_equal(design.topped_up(y, x), [1])
    assert len(design.rest) == 40 and not set(design.rest) & set(design.exact)
    assert set(design.rest) | set(design.exact) == set(design.lens)
