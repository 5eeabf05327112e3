"""Known-case tests of the hypothesis estimators (collapse_core.hypothesis) on synthetic
checkpoint tables: stage confounding, deduplication, lineages, verdicts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from collapse_core import hypothesis as H


def synthetic_table(
    n_runs: int = 6, n_stages: int = 3, within: float = 0.0, seed: int = 0
) -> pd.DataFrame:
    """A study of ``n_runs`` independent runs × ``n_stages`` trained stages plus a shared base.

    Both the metric and the outcome rise with the stage index (the confounder); ``within`` sets
    how strongly the outcome follows the metric's run-to-run deviation inside a stage."""
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(n_runs):
        rows.append({"run_id": f"r{r}", "stage_index": 0, "checkpoint_id": "base",
                     "effective_rank@mean": 0.0, "ood_accuracy": 0.0 + 0.01 * r})  # fmt: skip
        for s in range(1, n_stages + 1):
            dev = rng.normal()
            noise = rng.normal()
            rows.append({
                "run_id": f"r{r}", "stage_index": s, "checkpoint_id": f"c{r}-{s}",
                "effective_rank@mean": 10.0 * s + dev,
                "ood_accuracy": 10.0 * s + within * dev + (1 - abs(within)) * noise,
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_single_stratum_equals_spearman():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=20), rng.normal(size=20)
    y[3] = y[4]  # a tie
    assert H.stratified_spearman(x, y, np.zeros(20)) == pytest.approx(spearmanr(x, y).statistic)


def test_weights_equal_replicated_rows():
    """Bootstrap multiplicities give the ρ_w of the data with rows actually repeated."""
    rng = np.random.default_rng(2)
    x, y, s = rng.normal(size=12), rng.normal(size=12), np.repeat([0, 1, 2], 4)
    w = rng.integers(0, 3, 12)
    rep = np.repeat(np.arange(12), w)
    direct = H.stratified_spearman(x[rep], y[rep], s[rep])
    assert H.stratified_spearman(x, y, s, weights=w[None, :])[0] == pytest.approx(direct)


def test_stage_confounding_is_not_supported():
    """Pooled ρ is strong only because both rise with the stage; within stages nothing."""
    table = synthetic_table(n_runs=8, within=0.0, seed=2)  # a seed without chance association
    tests = H.test_table(table, metrics=["effective_rank"], positions=["mean"],
                         outcomes=["ood_accuracy"], n_boot=300, n_perm=500)  # fmt: skip
    row = tests.iloc[0]
    assert row["pooled_rho"] > 0.8
    assert abs(row["within_rho"]) < 0.5
    assert row["ci_low"] < 0 < row["ci_high"]
    assert row["verdict"] == "inconclusive"
    # The shared base counts once; it is not in any stratum of the within-stage test.
    assert row["n_checkpoints"] == 1 + 8 * 3
    assert row["n_within"] == 8 * 3 and row["n_lineages"] == 8


@pytest.mark.parametrize(("within", "verdict"), [(0.95, "supported"), (-0.95, "contradicted")])
def test_within_stage_association_gives_a_verdict(within, verdict):
    # effective rank (falls with collapse) vs OOD accuracy (falls when worse): expected +.
    assert H.expected_sign("effective_rank", "ood_accuracy") == 1
    table = synthetic_table(within=within, seed=3)
    tests = H.test_table(table, metrics=["effective_rank"], positions=["mean"],
                         outcomes=["ood_accuracy"], n_boot=300, n_perm=500)  # fmt: skip
    row = tests.iloc[0]
    assert np.sign(row["within_rho"]) == np.sign(within) and abs(row["within_rho"]) > 0.7
    assert row["p_perm"] < 0.01 and np.sign(row["fe_beta"]) == np.sign(within)
    assert row["verdict"] == verdict, row["reason"]


def test_too_few_independent_runs_is_inconclusive():
    table = synthetic_table(n_runs=2, n_stages=4, within=0.95)
    tests = H.test_table(table, metrics=["effective_rank"], positions=["mean"],
                         outcomes=["ood_accuracy"], n_boot=200, n_perm=200)  # fmt: skip
    assert tests.iloc[0]["verdict"] == "inconclusive"
    assert "independent runs" in tests.iloc[0]["reason"]


def test_runs_sharing_a_trained_checkpoint_are_one_lineage():
    table = synthetic_table(n_runs=3, n_stages=2)
    # runs r0 and r1 share their stage-1 checkpoint (e.g. two orders starting with the same sft)
    table.loc[(table["run_id"] == "r1") & (table["stage_index"] == 1), "checkpoint_id"] = "c0-1"
    lin = H.lineages(table)
    assert lin["r0"] == lin["r1"] != lin["r2"]
    points = H.independent_checkpoints(table)
    assert points["checkpoint_id"].is_unique
    assert points.set_index("checkpoint_id").loc["base", "lineage"] == "shared"
    assert points.set_index("checkpoint_id").loc["c0-1", "n_rows"] == 2


def test_permutation_p_is_not_small_under_the_null():
    ps = []
    for seed in range(20):
        t = synthetic_table(within=0.0, seed=100 + seed)
        t = t[t["stage_index"] > 0]
        ps.append(H.within_permutation_p(t["effective_rank@mean"], t["ood_accuracy"],
                                         t["stage_index"], 300, seed))  # fmt: skip
    ps = np.array(ps)
    assert 0.2 < ps.mean() < 0.8  # uniform-ish under the null
    assert (ps < 0.05).sum() <= 4


def test_verdict_text_lists_every_row():
    tests = H.test_table(synthetic_table(within=0.95, seed=3), metrics=["effective_rank"],
                         positions=["mean"], n_boot=100, n_perm=100)  # fmt: skip
    text = H.verdict_text(tests)
    assert "OOD accuracy" in text and "supported" in text
    # Columns stay apart with the longest outcome name (it ran into the verdict column).
    plasticity = tests.assign(outcome="plasticity_auc_rel")
    text = H.verdict_text(pd.concat([tests, plasticity], ignore_index=True))
    lines = text.splitlines()
    start = lines[0].index("verdict")
    body = [line for line in lines[2:] if line.startswith("effective_rank")]
    assert any("plasticity (rel. AUC)" in line for line in body)
    assert all(line[start - 1] == " " and line[start] != " " for line in body)


# -- on a real (tiny-model) study database -------------------------------------------------
def test_study_tests_computed_then_stored(observatory_db_copy):
    from collapse_core import views
    from collapse_core.store import Store

    store = Store(observatory_db_copy["db"])
    sid = observatory_db_copy["study_id"]
    table = H.checkpoint_table(store, sid, "general")
    assert len(table) == 6 and "effective_rank@mid" in table and "cka_drift@mid" in table
    assert "effective_rank_robust@mid" in table and table["ood_accuracy"].notna().all()
    points = H.independent_checkpoints(table)
    assert len(points) == 5  # the base is shared by both runs
    tests, source = views.hypothesis_tests(store, sid, "general")
    assert source == "computed" and not tests.empty
    # two runs that share only their base: two independent runs, never enough for a verdict
    assert (tests["verdict"] == "inconclusive").all() and (tests["n_lineages"] <= 2).all()
    assert set(tests["outcome"]) <= set(H.OUTCOMES)
    stored = H.analyze_study(store, sid, "general", n_boot=100, n_perm=100)
    assert len(stored) == len(tests)
    again, source = views.hypothesis_tests(store, sid, "general")
    assert source == "stored" and len(again) == len(tests)
    pooled = store.query("SELECT count(*) AS n FROM correlations WHERE study_id = ?", [sid])
    assert pooled["n"][0] == len(tests)
    row = views.test_row(again, "effective_rank", "mid", "ood_accuracy")
    assert row is not None and row["n_checkpoints"] == 5


def test_hypothesis_page_shows_a_verdict(observatory_db_copy, app_env):
    from streamlit.testing.v1 import AppTest

    from collapse_core.store import Store

    app_env["use"](observatory_db_copy["db"])
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    at = AppTest.from_file(str(root / "pages" / "hypothesis.py"), default_timeout=600)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    verdict = [m for m in at.metric if m.label == "Verdict"]
    assert verdict and verdict[0].value == "inconclusive"
    assert any("Computed now" in c.value for c in at.caption)
    # 2 runs: ρ is descriptive only, never a coloured grid cell or a bold number
    assert any("descriptive only" in m.value for m in at.markdown)
    assert any("No pair has enough independent runs" in c.value for c in at.caption)
    verdicts = next(df.value for df in at.dataframe if "ρ_w" in df.value.columns)
    assert verdicts["ρ_w"].isna().all() and "effective rank" in set(verdicts["metric"])
    # the arms: levels per arm, then the paired Δ table analyze prints, with its CI note
    deltas = next(df.value for df in at.dataframe if "pairs" in df.value.columns)
    assert deltas.set_index("at").loc["end", "Δ OOD ECE"] == "-0.030"
    assert any("paired by (order, seed)" in c.value for c in at.caption)
    H.analyze_study(Store(observatory_db_copy["db"]), observatory_db_copy["study_id"], "general",
                    n_boot=50, n_perm=50)  # fmt: skip
    at.run()
    assert any("Stored by" in c.value for c in at.caption)
    metric = next(box for box in at.selectbox if box.label == "Collapse metric")
    metric.set_value("stable_rank_robust").run()
    assert not at.exception
    assert any("Robust variant" in c.value for c in at.caption)


# -- the arm comparison (analysis.compare_arms) ----------------------------------------------
def test_arm_deltas_pair_runs_and_show_a_ci_only_over_enough_pairs(observatory_db):
    from collapse_core import analysis as A
    from collapse_core.store import Store

    store = Store(observatory_db["db"], read_only=True)
    table = A.compare_arms(store, observatory_db["study_id"], n_boot=200).set_index("at")
    assert list(table.index) == ["end", "stages >= 1", "stage 0:base", "stage 1:sft",
                                 "stage 2:math"]  # fmt: skip
    erank = table["d_effective_rank_mid"]
    assert erank["stage 0:base"] == 0.0  # both arms start from the one base checkpoint
    assert erank["end"] == erank["stage 2:math"] != 0.0
    # over the trained stages: the mean of the pair's Δ at stages 1 and 2, not stage 0 too
    assert erank["stages >= 1"] == pytest.approx((erank["stage 1:sft"] + erank["end"]) / 2)
    # one (order, seed) pair: no CI, since one pair says nothing about the spread
    assert (table["pairs"] == 1).all() and table["d_effective_rank_mid_lo"].isna().all()


def test_mean_ci_and_the_arm_text_say_what_is_within_noise():
    from collapse_core import analysis as A

    assert np.isnan(A._mean_ci(np.array([1.0, 2.0]), 100)[0])  # < MIN_ARM_PAIRS
    assert A._mean_ci(np.full(4, 0.25), 100) == (0.25, 0.25)
    low, high = A._mean_ci(np.array([1.0, 2.0, 3.0, 4.0, 5.0]), 2000)
    assert 1.0 <= low < 3.0 < high <= 5.0
    table = pd.DataFrame([
        {"arm": "replay", "at": "end", "pairs": 4, "d_effective_rank_mid": 0.5,
         "d_effective_rank_mid_lo": 0.2, "d_effective_rank_mid_hi": 0.8, "d_anisotropy": -0.01,
         "d_anisotropy_lo": -0.03, "d_anisotropy_hi": 0.02},
    ])  # fmt: skip
    text = A.arm_comparison_text(table)
    assert "+0.500 [+0.200, +0.800]*" in text  # excludes 0
    row = text.splitlines()[2]
    assert row.endswith("-0.010 [-0.030, +0.020]")  # includes 0: within noise, no mark


def test_cli_analyze_prints_stage_changes_with_cis_and_the_paired_arm_table(observatory_db_copy,
                                                                            capsys):  # fmt: skip
    from collapse_core.cli import main

    db = str(observatory_db_copy["db"])
    assert main(["analyze", "latest", "--db", db, "--n-boot", "50", "--n-perm", "50",
                 "--ci-boot", "20"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    changes = out[out.index("stage-to-stage changes") : out.index("hypothesis tests")]
    rows = [line for line in changes.splitlines() if line.startswith(("baseline", "replay"))]
    assert len(rows) == 6 and "effective_rank L1" in changes
    base, later = rows[0], rows[1:3]
    assert "[" in base and "Δ" not in base  # the first stage has nothing to change from
    assert all(line.count("Δ") == 4 for line in later)  # 2 metrics × mid and last layer
    assert "beyond prompt noise" in changes
    arms = out[out.index("intervention arms vs baseline") :]
    assert "stages >= 1" in arms and "paired by (order, seed)" in arms
