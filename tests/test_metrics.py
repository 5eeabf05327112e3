"""Closed-form checks of collapse_core.metrics: each would fail if its formula broke."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import collapse_core.metrics as M


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def data_with_spectrum(n: int, sv: np.ndarray, seed: int = 0) -> np.ndarray:
    """N × d data whose centred singular values are exactly ``sv`` (in a random rotation)."""
    r = rng(seed)
    d = sv.size
    z = r.standard_normal((n, d))
    z -= z.mean(axis=0)
    q, _ = np.linalg.qr(z)  # orthonormal columns, each orthogonal to the ones vector
    rot, _ = np.linalg.qr(r.standard_normal((d, d)))
    return (q * sv) @ rot + r.standard_normal(d) * 5.0  # arbitrary mean offset


# ---------------------------------------------------------------- spectral


def test_isotropic_gaussian_is_full_rank():
    d = 20
    x = rng(1).standard_normal((20000, d))
    assert M.effective_rank(x) == pytest.approx(d, rel=0.01)
    assert M.participation_ratio(x) == pytest.approx(d, rel=0.02)
    assert M.top_pc_share(x) == pytest.approx(1 / d, rel=0.1)
    assert M.stable_rank(x) == pytest.approx(d, rel=0.1)


def test_exact_rank_k_data():
    k = 3
    x = rng(2).standard_normal((500, k)) @ rng(3).standard_normal((k, 40)) + 7.0
    er = M.effective_rank(x)
    assert 1.0 < er <= k + 1e-5
    assert M.stable_rank(x) <= k + 1e-9
    assert M.participation_ratio(x) <= k + 1e-9
    eig = M.eigenvalues_from_covariance(np.cov(x, rowvar=False))
    assert M.effective_rank_from_eigenvalues(eig) <= k + 1e-5


def test_known_spectrum_3_1_1():
    x = data_with_spectrum(300, np.array([3.0, 1.0, 1.0]))
    sv = M.singular_values(x)
    np.testing.assert_allclose(sv, [3.0, 1.0, 1.0], atol=1e-12)
    assert M.stable_rank(x) == pytest.approx(11 / 9, abs=1e-12)
    assert M.participation_ratio(x) == pytest.approx(121 / 83, abs=1e-12)
    assert M.top_pc_share(x) == pytest.approx(9 / 11, abs=1e-12)
    p = np.array([3.0, 1.0, 1.0]) / 5 + M.RANKME_EPS
    assert M.effective_rank(x) == pytest.approx(math.exp(-np.sum(p * np.log(p))), abs=1e-12)
    # uncentred stable rank differs (the mean adds a direction)
    assert M.stable_rank(x, center=False) != pytest.approx(11 / 9, abs=1e-3)


def test_effective_rank_of_equal_singular_values_and_zero_spectrum():
    assert M.effective_rank_from_singular_values([2.0, 2.0, 2.0, 2.0, 0.0]) == pytest.approx(
        4.0, abs=1e-4
    )
    assert M.effective_rank(np.ones((5, 3))) == 0.0
    assert M.stable_rank(np.ones((5, 3))) == 0.0
    assert math.isnan(M.top_pc_share(np.ones((5, 3))))


def test_alpha_req_power_law():
    eig = np.arange(1, 201, dtype=float) ** -1.5
    alpha, r2 = M.alpha_req_from_eigenvalues(eig)
    assert alpha == pytest.approx(1.5, abs=1e-10)
    assert r2 == pytest.approx(1.0, abs=1e-12)
    alpha, _ = M.alpha_req_from_eigenvalues(rng(4).permutation(eig), fit_range=(5, 50))
    assert alpha == pytest.approx(1.5, abs=1e-10)
    # from data with exactly that covariance spectrum
    n = 400
    x = data_with_spectrum(n, np.sqrt(eig[:60] * (n - 1)))
    np.testing.assert_allclose(M.covariance_eigenvalues(x), eig[:60], rtol=1e-9)
    alpha, r2 = M.alpha_req(x)
    assert alpha == pytest.approx(1.5, abs=1e-8) and r2 == pytest.approx(1.0, abs=1e-10)
    # a bent spectrum fits worse
    _, r2_bent = M.alpha_req_from_eigenvalues(np.exp(-np.arange(200) / 10.0))
    assert r2_bent < 0.95
    with pytest.raises(ValueError):
        M.alpha_req_from_eigenvalues(eig, fit_range=(0, 10))


def test_covariance_from_moments_matches_np_cov():
    r = rng(5)
    x = r.standard_normal((1000, 8)) * np.arange(1, 9) + 1e4
    expected = np.cov(x, rowvar=False)
    shift = x[:100].mean(axis=0)  # first batch's mean
    total = [0, np.zeros(8), np.zeros((8, 8))]
    for batch in np.array_split(x, 7):
        n, s, ss = M.batch_moments(batch, shift=shift)
        total = [total[0] + n, total[1] + s, total[2] + ss]
    cov = M.covariance_from_moments(*total, shift=shift)
    np.testing.assert_allclose(cov, expected, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(M.mean_from_moments(total[0], total[1], shift), x.mean(axis=0))
    np.testing.assert_allclose(
        M.eigenvalues_from_covariance(cov), np.linalg.eigvalsh(expected)[::-1], rtol=1e-8
    )
    # unshifted small-offset data: raw sums work too
    y = x - 1e4
    cov_raw = M.covariance_from_moments(len(y), y.sum(0), y.T @ y)
    np.testing.assert_allclose(cov_raw, np.cov(y, rowvar=False), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError):
        M.covariance_from_moments(1, np.zeros(3), np.zeros((3, 3)))


def test_graded_covariance_keeps_its_bulk_spectrum():
    """A rogue coordinate 300× the bulk (λ_max / λ_min ≈ 1e9): the solver keeps every bulk
    eigenvalue to 1e-6 relative of the float64 SVD of the data, and the effective rank to
    1e-9. (A float32 solver, 1.6× faster, misses the effective rank by 4e-4 here.)"""
    r = rng(11)
    x = r.standard_normal((400, 96)) * np.geomspace(5.0, 0.05, 96)
    x[:, 7] *= 300.0
    eig = M.eigenvalues_from_covariance(np.cov(x, rowvar=False))
    reference = M.covariance_eigenvalues(x)
    assert reference[0] / reference[-1] > 1e8
    np.testing.assert_allclose(eig, reference, rtol=1e-6)
    assert M.effective_rank_from_eigenvalues(eig) == pytest.approx(
        M.effective_rank_from_eigenvalues(reference), rel=1e-9
    )


def test_rank_bound_zeroes_the_null_space_noise_of_a_float32_covariance():
    """A covariance of n < d samples has rank ≤ n − 1. Summed in float32 (as the probe does)
    its null space holds rounding noise that the effective rank (of √λ) counts; with
    ``n_samples`` those eigenvalues are exactly 0 and the metrics are the float64 SVD's."""
    r = rng(12)
    n, d = 40, 120
    x = r.standard_normal((n, d)) * np.geomspace(3.0, 0.1, d) + 50.0
    y = (x - x[:8].mean(0)).astype(np.float32)  # shifted, like the capture's sums
    sums = y.sum(0, dtype=np.float32).astype(np.float64)
    gram = (y.T @ y).astype(np.float64)
    cov = M.covariance_from_moments(n, sums, gram)
    reference = M.effective_rank(x)
    noisy = M.eigenvalues_from_covariance(cov)
    assert noisy[n - 1 :].max() > 0  # the noise the bound removes
    assert abs(M.effective_rank_from_eigenvalues(noisy) / reference - 1) > 1e-3
    eig = M.eigenvalues_from_covariance(cov, n_samples=n)
    assert np.all(eig[n - 1 :] == 0.0) and eig[n - 2] > 0
    assert M.effective_rank_from_eigenvalues(eig) == pytest.approx(reference, rel=1e-4)
    assert M.participation_ratio_from_eigenvalues(eig) == pytest.approx(
        M.participation_ratio(x), rel=1e-4
    )
    robust = M.spectral_without_rogue(cov, n_samples=n)
    keep = np.setdiff1d(np.arange(d), M.rogue_dimensions(np.cov(x, rowvar=False)))
    assert robust["effective_rank_robust"] == pytest.approx(M.effective_rank(x[:, keep]), rel=1e-4)
    assert np.array_equal(M.eigenvalues_from_covariance(cov, n_samples=d + 5), noisy)


def test_torch_input_and_shape_errors():
    x = rng(6).standard_normal((50, 5))
    assert M.effective_rank(torch.from_numpy(x).float()) == pytest.approx(
        M.effective_rank(x), rel=1e-5
    )
    assert isinstance(M.stable_rank(torch.from_numpy(x)), float)
    with pytest.raises(ValueError, match="rows"):
        M.effective_rank(np.ones((1, 4)))
    with pytest.raises(ValueError, match="2-D"):
        M.participation_ratio(np.ones(4))


# ---------------------------------------------------------------- geometry


def test_anisotropy_cosine():
    v = rng(7).standard_normal(16)
    assert M.anisotropy_cosine(np.tile(v, (10, 1)) * np.arange(1, 11)[:, None]) == pytest.approx(1)
    assert M.anisotropy_cosine(np.eye(16)[:10] * 3.0) == pytest.approx(0.0, abs=1e-15)
    x = rng(8).standard_normal((30, 6)) + 0.5
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = xn @ xn.T
    direct = (c.sum() - np.trace(c)) / (30 * 29)
    assert M.anisotropy_cosine(x) == pytest.approx(direct, abs=1e-12)
    assert M.anisotropy_cosine_from_sums(xn.sum(0), 30) == pytest.approx(direct, abs=1e-12)


def test_twonn_dimension():
    r = rng(9)
    plane = r.uniform(size=(2000, 2)) @ r.standard_normal((2, 50))
    assert M.twonn_dimension(plane) == pytest.approx(2.0, abs=0.3)
    gauss5 = r.standard_normal((2000, 5))
    assert M.twonn_dimension(gauss5) == pytest.approx(5.0, abs=0.8)
    assert M.twonn_dimension(gauss5, method="mle") == pytest.approx(5.0, abs=0.8)
    # duplicates are dropped rather than producing infinite ratios
    dup = np.vstack([plane, plane[:100]])
    assert M.twonn_dimension(dup) == pytest.approx(2.0, abs=0.3)
    # high ambient dimension (as in the probe's 512 x 576 samples): finite and positive
    big = r.standard_normal((2000, 576)).astype(np.float32)
    assert np.isfinite(M.twonn_dimension(big)) and M.twonn_dimension(big) > 50


def test_two_nearest_distances_match_differences_even_where_the_product_form_cancels():
    """The 1st/2nd nearest-neighbour distances equal scipy's difference-based ones to 1e-9 on
    rows with a huge common offset (where ‖x‖² + ‖y‖² − 2x·y cancels), exact duplicates (0)
    and near-duplicates 1e-5 apart, over more than one row chunk."""
    from scipy.spatial.distance import cdist

    from collapse_core.metrics.geometry import _CANCELLATION_FLOOR, _two_nearest_distances

    r = rng(13)
    base = 1e3 + r.standard_normal((2000, 20))
    x = np.vstack([base, base[:50], base[50:100] + 1e-5 * r.standard_normal((50, 20))])
    assert x.shape[0] > (1 << 22) // x.shape[0]  # several chunks
    full = cdist(x, x)
    np.fill_diagonal(full, np.inf)
    expected = np.sort(full, axis=1)[:, :2]
    got = _two_nearest_distances(x)
    assert np.all(got[:50, 0] == 0.0) and np.all(got[2000:2050, 0] == 0.0)
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=0)
    # no offset: no row is near the cancellation floor, so all take the product form
    for y in (r.standard_normal((600, 64)) * np.geomspace(3, 0.3, 64) + 0.5, base[:3] - 1e3):
        sq = np.einsum("ij,ij->i", y, y)
        full = cdist(y, y)
        np.fill_diagonal(full, np.inf)
        expected = np.sort(full, axis=1)[:, :2]
        if len(y) > 3:
            assert np.all(expected[:, 0] ** 2 > 100 * _CANCELLATION_FLOOR * (sq + sq.max()))
        np.testing.assert_allclose(_two_nearest_distances(y), expected, rtol=1e-9, atol=0)


def test_linear_cka():
    r = rng(10)
    x = r.standard_normal((300, 10))
    q, _ = np.linalg.qr(r.standard_normal((10, 10)))
    assert M.linear_cka(x, x @ q) == pytest.approx(1.0, abs=1e-12)
    assert M.linear_cka(x, -3.5 * x + 2.0) == pytest.approx(1.0, abs=1e-12)
    assert M.linear_cka(x, r.standard_normal((300, 10))) < 0.1
    # N < d uses the Gram form; must equal the feature-space formula
    xs, ys = r.standard_normal((20, 40)), r.standard_normal((20, 30))
    xc, yc = xs - xs.mean(0), ys - ys.mean(0)
    expected = np.linalg.norm(yc.T @ xc) ** 2 / (
        np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    )
    assert M.linear_cka(xs, ys) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError):
        M.linear_cka(x, x[:-1])


def test_homogeneity_streaming_equals_direct():
    r = rng(11)
    ids = np.repeat(np.arange(6), [5, 1, 8, 3, 4, 7])
    x = r.standard_normal((ids.size, 12)) + r.standard_normal((6, 12))[ids]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    c = xn @ xn.T
    same = ids[:, None] == ids[None, :]
    off = ~np.eye(ids.size, dtype=bool)
    within = c[same & off].mean()
    between = c[~same].mean()
    out = M.homogeneity(x, ids)
    assert out["within_prompt_cosine"] == pytest.approx(within, abs=1e-12)
    assert out["between_prompt_cosine"] == pytest.approx(between, abs=1e-12)
    assert out["homogeneity_gap"] == pytest.approx(within - between, abs=1e-12)
    sums = np.stack([xn[ids == p].sum(0) for p in range(6)])
    counts = np.bincount(ids)
    stream = M.homogeneity_from_sums(sums, counts)
    for key, value in out.items():
        assert stream[key] == pytest.approx(value, abs=1e-12)
    assert out["homogeneity_gap"] > 0  # prompts share a direction


def test_nc1():
    r = rng(12)
    means = r.standard_normal((4, 6)) * 5
    labels = np.repeat(np.arange(4), 50)
    noise = r.standard_normal((200, 6))
    # one singleton class is skipped
    x = np.vstack([means[labels] + noise, r.standard_normal((1, 6))])
    lab = np.append(labels, 99)
    got = M.nc1(x, lab)
    h, cls = x[:200], labels
    mu = np.stack([h[cls == c].mean(0) for c in range(4)])
    sw = sum(np.outer(v, v) for v in h - mu[cls]) / 200
    db = mu - h.mean(0)
    sb = db.T @ db / 4
    assert got == pytest.approx(np.trace(sw @ np.linalg.pinv(sb)) / 4, rel=1e-8)
    # perfectly collapsed classes → 0; less spread → smaller NC1
    assert M.nc1(means[labels], labels) == pytest.approx(0.0, abs=1e-20)
    assert M.nc1(means[labels] + 0.1 * noise, labels) < got
    assert math.isnan(M.nc1(x[:3], [0, 1, 2]))


# ---------------------------------------------------------------- units


def test_dormant_fraction():
    acts = rng(13).standard_normal((64, 10))
    acts[:, [1, 4, 7]] = 0.0
    assert M.dormant_fraction(acts, tau=0.0) == pytest.approx(0.3)
    assert M.dormant_fraction(torch.from_numpy(acts).reshape(8, 8, 10)) == pytest.approx(0.3)
    scale = np.ones(10)
    scale[0] = 0.01  # s_0 = 0.01 / mean(...) ≈ 0.011 < 0.025
    assert M.dormant_fraction_from_mean_abs(scale, tau=0.025) == pytest.approx(0.1)
    assert M.dormant_fraction_from_mean_abs(np.zeros(4)) == 1.0


# ---------------------------------------------------------------- calibration


def test_ece_of_calibrated_set_is_small():
    r = rng(14)
    conf = r.uniform(size=200_000)
    correct = r.uniform(size=conf.size) < conf
    assert M.expected_calibration_error(conf, correct) < 0.01


def test_ece_mce_of_overconfident_set_by_hand():
    conf = np.array([0.9] * 10 + [0.7] * 10)
    correct = np.array([1] * 5 + [0] * 5 + [1] * 6 + [0] * 4)
    # bins of width 1/15: 0.9 in (0.8667, 0.9333], 0.7 in (0.6667, 0.7333]
    assert M.expected_calibration_error(conf, correct) == pytest.approx(
        0.5 * 0.4 + 0.5 * 0.1, abs=1e-12
    )
    assert M.maximum_calibration_error(conf, correct) == pytest.approx(0.4, abs=1e-12)
    rows = M.reliability_bins(conf, correct)
    assert len(rows) == 15 and sum(b["count"] for b in rows) == 20
    b13 = rows[13]
    assert b13["count"] == 10 and b13["accuracy"] == 0.5
    assert b13["mean_confidence"] == pytest.approx(0.9, abs=1e-12)
    assert b13["lower"] == pytest.approx(13 / 15) and b13["upper"] == pytest.approx(14 / 15)
    assert rows[0]["count"] == 0 and math.isnan(rows[0]["accuracy"])


def test_bin_edges():
    rows = M.reliability_bins([0.0, 0.5, 1.0], [1, 1, 1], n_bins=2)
    assert [b["count"] for b in rows] == [2, 1]  # 0 → first bin; 0.5 ∈ (0, 0.5]; 1 ∈ (0.5, 1]
    with pytest.raises(ValueError):
        M.expected_calibration_error([1.2], [1])


def test_brier_score():
    labels = np.array([0, 2, 1, 2])
    assert M.brier_score(np.eye(3)[labels], labels) == 0.0
    for c in (2, 5, 10):
        assert M.brier_score(np.full((4, c), 1 / c), labels % c) == pytest.approx((c - 1) / c)
    assert M.brier_score(np.array([0.8, 0.3]), np.array([1, 0])) == pytest.approx((0.04 + 0.09) / 2)
    with pytest.raises(ValueError):
        M.brier_score(np.eye(3), np.array([0, 1, 3]))


# ---------------------------------------------------------------- subspace


def test_principal_angles_and_overlap():
    r = rng(15)
    u = r.standard_normal((20, 4))
    mix = r.standard_normal((4, 4))
    np.testing.assert_allclose(M.principal_angles(u, u @ mix), 0.0, atol=1e-7)
    assert M.subspace_overlap(u, u @ mix) == pytest.approx(1.0, abs=1e-12)
    e = np.eye(20)
    np.testing.assert_allclose(M.principal_angles(e[:, :3], e[:, 3:8]), np.pi / 2, atol=1e-12)
    assert M.subspace_overlap(e[:, :3], e[:, 3:8]) == pytest.approx(0.0, abs=1e-15)
    # 45° between span(e0) and span(e0 + e1); ascending with a 2-D pair
    ang = M.principal_angles(e[:, :2], np.stack([e[0], e[1] + e[2]], axis=1))
    np.testing.assert_allclose(ang, [0.0, np.pi / 4], atol=1e-12)
    assert M.subspace_overlap(e[:, :2], np.stack([e[0], e[1] + e[2]], 1)) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        M.principal_angles(np.ones((20, 2)), u)  # dependent columns


def test_update_spectrum_metrics():
    r = rng(16)
    b, a = r.standard_normal((30, 4)), r.standard_normal((4, 20))
    out = M.update_spectrum_metrics(b @ a, k=4)
    assert out["effective_rank"] <= 4 + 1e-5 and out["stable_rank"] <= 4
    assert out["top_k_energy"] == pytest.approx(1.0, abs=1e-12)
    d = np.zeros((6, 5))
    d[0, 0], d[1, 1], d[2, 2] = 3.0, 1.0, 1.0
    out = M.update_spectrum_metrics(d + 0.0)
    assert out["stable_rank"] == pytest.approx(11 / 9)
    assert out["spectral_norm"] == 3.0 and out["frobenius_norm"] == pytest.approx(math.sqrt(11))
    sub = M.top_singular_subspace(d, 1)
    assert abs(sub[0, 0]) == pytest.approx(1.0)


def test_intruder_dimensions():
    r = rng(17)
    w0 = r.standard_normal((40, 20))
    u0, s0, vt0 = np.linalg.svd(w0, full_matrices=False)
    # a direction orthogonal to all of W0's left singular vectors
    u_new = r.standard_normal(40)
    u_new -= u0 @ (u0.T @ u_new)
    u_new /= np.linalg.norm(u_new)
    w1 = w0 + 10 * s0[0] * np.outer(u_new, vt0[-1])
    assert M.intruder_dimensions(w0, w1, k=10) == 1
    assert M.intruder_dimensions(w0, w0, k=10) == 0
    assert M.intruder_dimensions(w0, w0 + 1e-3 * r.standard_normal(w0.shape), k=10) == 0


# ---------------------------------------------------------------- logits


def test_entropy_and_margin():
    v = 37
    assert M.entropy_from_logits(np.full((3, v), 4.2)) == pytest.approx(np.log(v))
    assert M.entropy_from_logits(np.array([[1000.0, -1000.0, -np.inf]]))[0] == pytest.approx(0.0)
    logits = rng(18).standard_normal((5, 11)) * 3
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    np.testing.assert_allclose(M.entropy_from_logits(logits), -(p * np.log(p)).sum(1))
    ps = np.sort(p, axis=1)
    np.testing.assert_allclose(M.top1_margin_from_logits(logits), ps[:, -1] - ps[:, -2])
    t = torch.from_numpy(logits).to(torch.bfloat16)
    ent_t = M.entropy_from_logits_torch(t)
    assert isinstance(ent_t, torch.Tensor) and ent_t.shape == (5,)
    np.testing.assert_allclose(ent_t.numpy(), M.entropy_from_logits(t), rtol=1e-5)
    np.testing.assert_allclose(
        M.top1_margin_from_logits_torch(torch.from_numpy(logits)).numpy(),
        ps[:, -1] - ps[:, -2],
        rtol=1e-12,
    )
    assert M.top1_margin_from_logits(np.zeros((1, 4)))[0] == 0.0


def test_version_and_exports():
    assert M.METRIC_CODE_VERSION == "3"
    for name in M.__all__:
        assert hasattr(M, name), name
