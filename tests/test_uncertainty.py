"""Prompt-bootstrap CIs of the per-layer metrics (collapse_core.uncertainty) and the robust
companions under a massive coordinate (collapse_core.metrics.robust)."""

from __future__ import annotations

import numpy as np
import pytest

from collapse_core import metrics as M
from collapse_core import uncertainty as U


def test_robust_companions_ignore_one_massive_coordinate():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 24))
    x[:6, 5] = 800.0  # a massive activation on a few tokens
    cov = np.cov(x, rowvar=False)
    eig = M.eigenvalues_from_covariance(cov)
    assert M.stable_rank_from_eigenvalues(eig) < 1.1  # the raw metric sees one direction
    assert M.top_pc_share_from_eigenvalues(eig) > 0.95
    robust = M.robust_companions(cov, x)
    clean = M.eigenvalues_from_covariance(np.cov(np.delete(x, [5], axis=1), rowvar=False))
    assert robust["stable_rank_robust"] > 10
    assert robust["top_pc_share_robust"] < 0.2
    assert robust["participation_ratio_robust"] == pytest.approx(
        M.participation_ratio_from_eigenvalues(clean), rel=0.1
    )
    assert 5 in M.rogue_dimensions(cov)


def test_centred_anisotropy_removes_the_mean_direction():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(400, 32)) + 6.0  # isotropic noise around a common offset
    assert M.anisotropy_cosine(x) > 0.9
    assert abs(M.centred_cosine_anisotropy(x)) < 0.02


def test_subsample_metrics_equal_the_stored_estimators_at_unit_weights():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(120, 16)).astype(np.float32)
    got = U.subsample_metrics(x, np.ones(120), U._distances(x))
    assert got["twonn_dimension"] == pytest.approx(M.twonn_dimension(x))
    assert got["effective_rank"] == pytest.approx(M.effective_rank(x), rel=1e-6)
    assert got["anisotropy_cosine"] == pytest.approx(M.anisotropy_cosine(x), abs=1e-9)
    assert got["anisotropy_centred"] == pytest.approx(M.centred_cosine_anisotropy(x), abs=1e-9)


def _clustered(rng, n_prompts: int, per_prompt: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Tokens = prompt effect (shared by the prompt's tokens, sd tau) + token noise + offset."""
    effects = rng.normal(scale=tau, size=(n_prompts, 6))
    ids = np.repeat(np.arange(n_prompts), per_prompt)
    x = 2.0 + effects[ids] + rng.normal(size=(ids.size, 6))
    return x.astype(np.float32), ids


def test_prompt_bootstrap_covers_the_population_value():
    """95 % CIs of the centred anisotropy cover its value on a huge sample most of the time."""
    rng = np.random.default_rng(3)
    big, _ = _clustered(rng, 4000, 4, 0.8)
    truth = M.centred_cosine_anisotropy(big)
    hits = 0
    trials = 30
    for t in range(trials):
        x, ids = _clustered(np.random.default_rng(100 + t), 40, 4, 0.8)
        ci = U.prompt_bootstrap(x, ids, n_boot=100, seed=t).set_index("metric")
        lo, hi = ci.loc["anisotropy_centred", ["lo", "hi"]]
        hits += lo <= truth <= hi
    assert hits / trials >= 0.8


def test_prompt_bootstrap_is_wider_than_a_token_bootstrap_under_prompt_effects():
    rng = np.random.default_rng(4)
    x, ids = _clustered(rng, 30, 8, 1.5)
    by_prompt = U.prompt_bootstrap(x, ids, n_boot=100).set_index("metric")
    by_token = U.prompt_bootstrap(x, np.arange(ids.size), n_boot=100).set_index("metric")

    def width(ci) -> float:
        return float(ci.loc["anisotropy_centred", "hi"] - ci.loc["anisotropy_centred", "lo"])

    assert width(by_prompt) > 1.5 * width(by_token)


def test_shifted_interval_is_centred_on_the_stored_value():
    rng = np.random.default_rng(5)
    x, ids = _clustered(rng, 30, 6, 0.5)
    ci = U.prompt_bootstrap(x, ids, stored={"effective_rank": 100.0}, n_boot=60)
    row = ci.set_index("metric").loc["effective_rank"]
    assert row["lo"] < 100.0 < row["hi"] and row["method"] == U.METHOD_SHIFTED
    assert "stable_rank" not in set(ci["metric"])  # no stored value → no interval


def test_all_token_metric_ci_holds_its_value_where_resampling_shifts_the_subsample():
    """Fewer subsample tokens than dimensions (SmolLM2: 512 at d = 576): a drawn prompt's
    copies add no directions, so every effective-rank replicate sits below the subsample's
    value. The basic interval mirrored that shift above the stored value and excluded it (on
    SmolLM2 at every layer); the spread interval keeps the value inside."""
    rng = np.random.default_rng(11)
    ids = np.repeat(np.arange(30), 4)
    x = (rng.normal(size=(30, 160))[ids] + rng.normal(size=(120, 160))).astype(np.float32)
    stored = float(M.effective_rank(x.astype(np.float64)))
    kept: dict = {}
    ci = U.prompt_bootstrap(x, ids, {"effective_rank": stored}, 80, keep=kept)
    row = ci.set_index("metric").loc["effective_rank"]
    assert row["lo"] < stored < row["hi"] and row["method"] == U.METHOD_SHIFTED
    sub, reps = kept["effective_rank"]
    assert reps.max() < sub  # the shift: every replicate below the subsample value
    basic_lo, _ = U.basic_interval(stored, reps)
    assert basic_lo > stored  # what the basic interval did with it


def test_exceeds_noise():
    assert U.exceeds_noise(10.0, 9.0, 11.0, 14.0, 13.0, 15.0)
    assert not U.exceeds_noise(10.0, 9.0, 11.0, 11.0, 10.0, 12.0)
    assert not U.exceeds_noise(10.0, np.nan, np.nan, 20.0, 19.0, 21.0)


def test_cis_stored_and_drawn(observatory_db_copy):
    from collapse_core import figures, views
    from collapse_core.store import Store

    store = Store(observatory_db_copy["db"])
    sid = observatory_db_copy["study_id"]
    keys = views.latest_probes(store, None, "general")
    assert U.store_cis(store, list(keys["probe_key"]), n_boot=30) == len(keys)
    assert U.store_cis(store, list(keys["probe_key"]), n_boot=30) == 0  # already stored
    sel = views.checkpoint_choices(store, study_id=sid, include_standalone=False)
    curves = views.layer_curves(store, "twonn_dimension", "general", sel)
    assert curves["lo"].notna().any()
    ok = curves.dropna(subset=["lo"])
    assert (ok["lo"] <= ok["hi"]).all()
    fig = figures.layer_curves_figure(curves, "TwoNN")
    assert any(getattr(t, "fill", None) == "toself" for t in fig.data)
    runs = list(views.runs(store, sid)["run_id"])
    stage = views.stage_curves(store, "effective_rank", "general", runs, layers=[1])
    assert stage["exceeds_noise"].dtype == bool and stage["lo"].notna().all()
    assert not stage.groupby(["run_id", "line"])["exceeds_noise"].first().any()
    # Every later stage's change is tested with the paired replicates (same prompts, same seed).
    later = stage[stage.groupby(["run_id", "line"]).cumcount() > 0]
    assert len(later) and (later["noise_test"] == "paired").all()
    assert "paired" in views.noise_note(stage)
    pairs = views.latest_probes(store, None, "general")["probe_key"].tolist()[:2]
    change = U.stage_change_cis(store, [tuple(pairs)], ["effective_rank"]).set_index("layer")
    vals = store.query(
        "SELECT probe_key, layer, value FROM layer_metrics WHERE metric = 'effective_rank' "
        "AND probe_key IN (?, ?)", pairs,
    ).pivot(index="layer", columns="probe_key", values="value")  # fmt: skip
    expect = vals[pairs[1]] - vals[pairs[0]]
    assert np.allclose(change["diff"].sort_index(), expect.loc[change.index].sort_index())
    assert (change["lo"] <= change["hi"]).all()
    # A file from before the replicates were stored gets them on the next analyze.
    store.execute("DELETE FROM layer_metric_boot WHERE probe_key = ?", [pairs[0]])
    assert U.store_cis(store, pairs, n_boot=30) == 1
    figures.stage_curves_figure(stage, "effective rank")
    # Another replicate count recomputes (paired CIs match replicate k across probes).
    assert U.store_cis(store, pairs, n_boot=24) == 2
    counts = store.query(
        "SELECT DISTINCT n_boot FROM layer_metric_boot WHERE probe_key IN (?, ?) UNION "
        "SELECT DISTINCT n_boot FROM layer_metric_ci WHERE probe_key IN (?, ?)",
        pairs * 2,
    )
    assert counts["n_boot"].tolist() == [24]
    # CIs stored with the earlier basic interval for all-token metrics are recomputed.
    store.execute("UPDATE layer_metric_ci SET method = 'prompt bootstrap of the subsample, basic "
                  "interval around the all-token value' WHERE probe_key = ? AND method = ?",
                  [pairs[0], U.METHOD_SHIFTED])  # fmt: skip
    assert U.store_cis(store, pairs, n_boot=24) == 1


def test_paired_change_ci_sees_a_change_the_two_cis_cannot():
    """One coordinate amplified ×1.1 at the later stage, same tokens: the effective rank drops
    by far less than either stage's own prompt-sampling CI is wide, yet the paired CI of the
    change excludes 0. A pure rescaling (scale-invariant metrics) gives Δ = 0 and no flag."""
    rng = np.random.default_rng(7)
    x_a, ids = _clustered(rng, 40, 8, 1.0)
    x_a = np.concatenate([x_a, rng.normal(size=(x_a.shape[0], 10)).astype(np.float32)], axis=1)
    x_b = x_a.copy()
    x_b[:, 3] *= 1.1
    reps_a, reps_b = U.bootstrap_replicates(x_a, ids, 80), U.bootstrap_replicates(x_b, ids, 80)
    (sa, ra), (sb, rb) = reps_a["effective_rank"], reps_b["effective_rank"]
    diff, lo, hi = U.paired_change_ci(sa, sb, sa, sb, ra, rb, from_subsample=True)
    assert diff < 0 and hi < 0 and lo <= hi
    ci = {name: U.prompt_bootstrap(x, ids, {"effective_rank": s}, 80).set_index("metric")
          for name, x, s in (("a", x_a, sa), ("b", x_b, sb))}  # fmt: skip
    a, b = ci["a"].loc["effective_rank"], ci["b"].loc["effective_rank"]
    # The unpaired test (both CIs combined) is blind to it: the prompt effect shared by both
    # stages dominates each CI but cancels in the paired difference.
    assert not U.exceeds_noise(sa, a["lo"], a["hi"], sb, b["lo"], b["hi"])
    scaled = U.bootstrap_replicates(x_a * 3.0, ids, 80)
    for metric in ("effective_rank", "stable_rank", "anisotropy_cosine"):
        s0, r0 = reps_a[metric]
        s1, r1 = scaled[metric]
        d, lo0, hi0 = U.paired_change_ci(s0, s1, s0, s1, r0, r1, from_subsample=True)
        assert abs(d) < 1e-4 and lo0 <= 1e-4 and hi0 >= -1e-4, metric
    # Unpaired replicates (another seed) are not a paired bootstrap: refused by the signature.
    import pandas as pd

    samples = pd.DataFrame({"prompt_idx": ids, "position": np.arange(ids.size), "token_id": 0})
    assert U.pairing_signature(samples, 80, 0) == U.pairing_signature(samples.copy(), 80, 0)
    assert U.pairing_signature(samples, 80, 0) != U.pairing_signature(samples, 80, 1)


def test_token_mean_metrics_are_weighted_means_of_the_drawn_tokens():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(12, 4)).astype(np.float32)
    values = {"next_token_entropy": np.arange(12.0)}
    w = np.array([2, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 3], dtype=float)
    got = U.subsample_metrics(x, w, None, values)
    assert got["next_token_entropy"] == pytest.approx((0 * 2 + 2 * 1 + 11 * 3) / 6)
    lens = np.full(12, np.nan)
    lens[[2, 5, 11]] = [1.0, 7.0, 4.0]  # only the lens tokens carry a value
    got = U.subsample_metrics(x, w, None, {"logit_lens_entropy": lens})
    assert got["logit_lens_entropy"] == pytest.approx((1.0 * 1 + 4.0 * 3) / 4)
    none = U.subsample_metrics(x, np.where(np.isnan(lens), 1.0, 0.0), None, {"m": lens})
    assert np.isnan(none["m"])  # no drawn token has a value


def test_next_token_metrics_get_prompt_bootstrap_cis(tmp_path):
    """A probe keeps the next-token entropy and margin of every subsample token; their means are
    the stored metrics, and the bootstrap gives both a CI around them at the last layer."""
    from collapse_core.probing import ProbeConfig, probe
    from collapse_core.store import Store
    from tiny_models import make_tiny_model

    make_tiny_model("llama", path=tmp_path / "tiny", seed=0)
    store = Store(tmp_path / "db.duckdb")
    config = ProbeConfig(max_length=24, n_samples=120, max_prompts=30)
    result = probe(str(tmp_path / "tiny"), "general", config, store=store, device="cpu")
    samples = store.query(
        "SELECT * FROM token_samples WHERE probe_key = ? ORDER BY sample_idx", [result.probe_key]
    )
    last = result.metrics.index.max()
    for metric in ("next_token_entropy", "top1_margin"):
        assert samples[metric].notna().all()
        assert samples[metric].mean() == pytest.approx(result.metrics.loc[last, metric], rel=1e-9)
    ci = U.probe_cis(store, result.probe_key, n_boot=40).set_index(["layer", "metric"])
    for metric in ("next_token_entropy", "top1_margin"):
        lo, hi, method = ci.loc[(last, metric), ["lo", "hi", "method"]]
        assert lo < result.metrics.loc[last, metric] < hi and method == U.METHOD_SUBSAMPLE
    assert (0, "next_token_entropy") not in ci.index  # only the last layer stores it
    # The logit lens: its entropy at each lens token is stored per layer; the mean of those is
    # the stored metric, and every layer gets a CI around it.
    lens = store.query(
        "SELECT layer, lens_entropy FROM token_vectors WHERE probe_key = ? ORDER BY layer",
        [result.probe_key],
    )
    for row in lens.itertuples():
        values = np.frombuffer(bytes(row.lens_entropy), dtype=np.float64)
        assert np.isfinite(values).sum() == config.lens_samples and values.size == len(samples)
        stored = result.metrics.loc[row.layer, "logit_lens_entropy"]
        assert np.nanmean(values) == pytest.approx(stored, rel=1e-9)
        lo, hi = ci.loc[(row.layer, "logit_lens_entropy"), ["lo", "hi"]]
        assert lo <= stored <= hi and hi > lo
