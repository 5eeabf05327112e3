"""The data shaping behind the pages (collapse_core.views), the embedding cache
(collapse_core.embeddings + the ``embedding`` job) and the figure builders, on the fixture
database of conftest.py."""

from __future__ import annotations

import json
import os
import re

import numpy as np
import pandas as pd
import pytest

from collapse_core import embeddings, figures, views
from collapse_core.eval_intervals import format_estimate
from collapse_core.jobs import queue, worker
from collapse_core.store import Store

BASE, REPLAY = "run-obs-base", "run-obs-replay"


@pytest.fixture(scope="module")
def store(observatory_db) -> Store:
    return Store(observatory_db["db"])


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory) -> Store:
    return Store(tmp_path_factory.mktemp("empty_views") / "empty.duckdb")


# -- catalog -------------------------------------------------------------------------------
def test_catalog_runs_stages_and_standalone(store, observatory_db):
    runs = views.runs(store, observatory_db["study_id"])
    assert list(runs["label"]) == ["baseline", "replay"]
    assert list(runs["n_stages"]) == [3, 3] and list(runs["n_planned"]) == [3, 3]
    cat = views.stage_catalog(store, [REPLAY, BASE])
    assert list(cat["key"]) == [f"{REPLAY}/0", f"{REPLAY}/1", f"{REPLAY}/2", f"{BASE}/0",
                                f"{BASE}/1", f"{BASE}/2"], "run order as given, then stage"  # fmt: skip
    assert cat["label"].iloc[1] == "replay · 1:sft"
    one = views.stage_catalog(store, [BASE])
    assert list(one["label"]) == ["0:base", "1:sft", "2:math"]
    sa = views.standalone_checkpoints(store)
    assert list(sa["checkpoint_id"]) == [observatory_db["standalone"]]
    choices = views.checkpoint_choices(store, study_id=observatory_db["study_id"])
    assert choices["label"].is_unique and choices["key"].is_unique
    assert len(choices) == 7 and choices["group"].iloc[-1] == "standalone"
    assert views.checkpoint_choices(store, run_ids=[], include_standalone=False).empty


def test_latest_probe_wins(observatory_db_copy):
    store = Store(observatory_db_copy["db"])
    ckpt = observatory_db_copy["standalone"]
    old = views.latest_probes(store, [ckpt], "general")
    assert len(old) == 1
    store.execute(
        "INSERT INTO probes (probe_key, checkpoint_id, probe_set, n_layers, created_at) "
        "VALUES ('newer', ?, 'general', 3, now() + INTERVAL 1 DAY)",
        [ckpt],
    )
    store.execute(
        "INSERT INTO layer_metrics VALUES ('newer', ?, 'general', 0, 'effective_rank', 99.0)",
        [ckpt],
    )
    assert views.latest_probes(store, [ckpt], "general")["probe_key"].tolist() == ["newer"]
    vals = views.layer_values(store, "effective_rank", "general", [ckpt])
    assert vals["value"].tolist() == [99.0], "only the newest probe's rows are used"


# -- layer metrics -------------------------------------------------------------------------
def test_heatmap_is_layers_by_checkpoints(store, observatory_db):
    sel = views.checkpoint_choices(store, study_id=observatory_db["study_id"])
    mat = views.metric_heatmap(store, "effective_rank", "general", sel)
    assert list(mat.index) == list(range(observatory_db["n_layers"]))
    assert list(mat.columns) == list(sel["label"]), "columns in selection order"
    lm = store.query(
        "SELECT value FROM layer_metrics WHERE checkpoint_id = ? AND probe_set = 'general' "
        "AND metric = 'effective_rank' AND layer = 2",
        [observatory_db["standalone"]],
    )
    assert mat.loc[2, "tiny-standalone"] == pytest.approx(lm["value"][0])
    # the shared base checkpoint is one column per run
    assert mat["baseline · 0:base"].equals(mat["replay · 0:base"])


def test_stage_curves_ordered_by_stage_index(store):
    df = views.stage_curves(store, "anisotropy_cosine", "general", [BASE, REPLAY])
    assert set(df["line"]) == {"L0", "L1", "L2"}
    for _, grp in df.groupby(["run_id", "line"]):
        assert grp["stage_index"].tolist() == [0, 1, 2]
        assert grp["stage_label"].tolist() == ["0:base", "1:sft", "2:math"]
    grouped = views.stage_curves(store, "anisotropy_cosine", "general", [BASE], n_groups=2)
    assert grouped["line"].unique().tolist() == ["L0–1", "L2"]
    full = df[df["run_id"] == BASE]
    expect = full[full["line"].isin(["L0", "L1"])].groupby("stage_index")["value"].mean()
    got = grouped[grouped["line"] == "L0–1"].set_index("stage_index")["value"]
    assert np.allclose(got.sort_index(), expect.sort_index())
    chosen = views.stage_curves(store, "anisotropy_cosine", "general", [BASE], layers=[2])
    assert chosen["line"].unique().tolist() == ["L2"] and len(chosen) == 3


def test_layer_groups_cover_every_layer():
    groups = views.layer_groups(range(31), 4)
    assert sorted(groups) == list(range(31))
    assert list(dict.fromkeys(groups.values())) == ["L0–7", "L8–15", "L16–23", "L24–30"]
    assert views.layer_groups([3], 4) == {3: "L3"}
    assert views.layer_groups([], 4) == {}


def test_depth_curves_one_line_per_stage(store):
    df = views.depth_curves(store, "effective_rank", "math", [BASE])
    assert df.groupby("stage_index")["layer"].apply(list).tolist() == [[0, 1, 2]] * 3


def test_alpha_fit_matches_stored_and_fit_line(store, observatory_db):
    sel = views.checkpoint_choices(store, run_ids=[BASE], include_standalone=False)
    spec, fits, lines = views.spectrum_panel(store, "general", 1, sel)
    assert spec.groupby("key")["idx"].min().eq(1).all()
    assert np.allclose(fits["alpha"], fits["alpha_stored"])
    assert np.allclose(fits["r2"], fits["r2_stored"])
    f = fits.iloc[0]
    assert f["start"] == 1 and f["stop"] == 16, "top half of the 32-dim spectrum"
    line = lines[lines["key"] == f["key"]]
    slope = np.diff(np.log(line["eigenvalue"])) / np.diff(np.log(line["idx"]))
    assert slope[0] == pytest.approx(-f["alpha"])


def test_alpha_fit_closed_form():
    lam = 3.0 * np.arange(1, 41, dtype=float) ** -1.5
    fit = views.alpha_fit(lam)
    assert fit["alpha"] == pytest.approx(1.5) and fit["r2"] == pytest.approx(1.0)
    assert fit["intercept"] == pytest.approx(np.log(3.0))


# -- evals, headline, calibration ----------------------------------------------------------
def test_evals_wide_and_headline(store, observatory_db):
    ev = views.evals_wide(store, [BASE])
    assert ev["plasticity_auc_rel"].tolist() == pytest.approx([1.0, 1.15, 1.3])
    head = views.headline_table(store, "general", study_id=observatory_db["study_id"])
    assert len(head) == 6 and list(head.columns[: len(views.HEADLINE_COLUMNS)]) == \
        views.HEADLINE_COLUMNS  # fmt: skip
    assert all(len(v) == observatory_db["n_layers"] for v in head["erank_layers"])
    row = head[head["key"] == f"{BASE}/2"].iloc[0]
    assert row["behaviour"] == f"own loss {row['stage_behaviour']:.3f} · answer acc 0.20"
    assert row["erank_mid"] == pytest.approx(row["erank_layers"][1])
    assert row["anisotropy"] == pytest.approx(np.mean(row["aniso_layers"]))
    assert head[head["stage_index"] == 0]["plasticity"].tolist() == [1.0, 1.0]
    # OOD scores keep their stored interval; the displayed table shows "v [lo, hi]", and the
    # bare value where none is stored (the fixture's ECE rows have none).
    first = head.iloc[0]
    assert first["ood_accuracy_lo"] < first["ood_accuracy"] < first["ood_accuracy_hi"]
    shown = views.headline_display(head).iloc[0]
    assert shown["ood_accuracy"] == format_estimate(
        first["ood_accuracy"], first["ood_accuracy_lo"], first["ood_accuracy_hi"]
    )
    assert "[" in shown["ood_accuracy"] and shown["ood_ece"] == f"{first['ood_ece']:.3f}"


def test_calibration_views(store):
    sel = views.checkpoint_choices(store, run_ids=[BASE], include_standalone=False)
    bins = views.calibration_bins(store, sel)
    assert (bins["count"] > 0).all() and bins.groupby("key").size().eq(11).all()
    assert bins.groupby("key")["bin"].apply(lambda s: s.is_monotonic_increasing).all()
    summ = views.calibration_summary(store, [BASE])
    assert summ["ece"].tolist() == pytest.approx([0.08, 0.12, 0.16])
    # Stored intervals travel to the table; a score stored without one shows its bare value.
    assert summ["n"].tolist() == [40, 40, 40] and summ["ece_lo"].isna().all()
    assert (summ["accuracy_lo"] < summ["accuracy"]).all()
    assert (summ["accuracy"] < summ["accuracy_hi"]).all()
    shown = views.with_intervals(summ, views.CALIBRATION_METRICS)
    first = summ.iloc[0]
    assert shown["accuracy"].iloc[0] == (
        f"{first['accuracy']:.3f} [{first['accuracy_lo']:.3f}, {first['accuracy_hi']:.3f}]"
    )
    assert shown["ece"].iloc[0] == "0.080"
    long = views.outcome_across_stages(store, [BASE, REPLAY])
    acc = long[(long["outcome"] == "ood_accuracy") & (long["run_id"] == REPLAY)]
    assert acc["stage_index"].tolist() == [0, 1, 2]
    assert (acc["lo"] < acc["value"]).all() and set(acc["n"]) == {40}
    fig = figures.outcomes_figure(long, {})
    bars = [t.error_y for t in fig.data if t.error_y.array is not None]
    assert len(bars) == 2 and all(min(b.array) > 0 and min(b.arrayminus) > 0 for b in bars)
    table = views.evals_table(store, [BASE])  # the report's evaluations table
    assert len(table) == 3 and table.columns[0] == "label"
    assert all(re.fullmatch(r"0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]", v) for v in table["ood_accuracy"])
    assert not any("[" in v for v in table["ood_ece"]) and "ood_accuracy_lo" not in table
    assert views.calibration_evals(store) == ["ood"]


# -- LoRA ----------------------------------------------------------------------------------
def test_lora_views(store):
    assert views.lora_runs(store) == [BASE, REPLAY]
    table = views.lora_update_table(store, BASE, "effective_rank")
    assert list(table.index) == ["1:sft", "2:math"]
    assert list(table.columns) == ["L0.q_proj", "L0.v_proj", "L1.q_proj", "L1.v_proj"]
    pair = views.lora_pair_matrix(store, BASE, "subspace_overlap")
    assert list(pair.index) == ["1:sft", "2:math"]
    assert np.allclose(pair.to_numpy(), pair.to_numpy().T)
    assert np.allclose(np.diag(pair.to_numpy()), 1.0)
    assert 0 < pair.loc["1:sft", "2:math"] < 1
    one = views.lora_pair_matrix(store, BASE, "principal_angle_mean",
                                 module="model.layers.1.self_attn.v_proj")  # fmt: skip
    assert np.allclose(np.diag(one.to_numpy()), 0.0)
    assert "subspace_overlap" in views.lora_metric_names(store, BASE, pairwise=True)
    assert views.short_module("base_model.model.layers.12.mlp.up_proj") == "L12.up_proj"
    summary = views.lora_stage_summary(store, BASE)
    assert summary["stage"].tolist() == ["1:sft", "2:math"]


# -- hypothesis ----------------------------------------------------------------------------
def test_intervention_table_groups_arms(store, observatory_db):
    arms = views.intervention_table(store, observatory_db["study_id"], "general")
    assert arms["arm"].tolist() == ["baseline", "replay"]
    assert arms["runs"].tolist() == [1, 1] and arms["final stage"].tolist() == ["2:math"] * 2
    assert arms["OOD ECE"].tolist() == pytest.approx([0.16, 0.13])
    assert not any(c.startswith("Δ") for c in arms)  # differences: paired, in arm_deltas
    deltas = views.arm_deltas(store, observatory_db["study_id"], "general", n_boot=50)
    end = deltas.set_index("at").loc["end"]
    assert end["arm"] == "replay" and end["pairs"] == 1
    assert end["Δ OOD ECE"] == "-0.030"  # one pair: the Δ without a CI


def test_views_on_empty_database(empty_store):
    s = empty_store
    assert views.is_empty(s) and views.studies(s).empty and views.runs(s).empty
    assert views.stage_catalog(s).empty and views.standalone_checkpoints(s).empty
    assert views.checkpoint_choices(s).empty and views.probe_sets(s) == []
    assert views.headline_table(s, "general").empty and views.standalone_table(s).empty
    assert views.stage_curves(s, "effective_rank", "general", []).empty
    assert views.metric_heatmap(s, "effective_rank", "general", views.checkpoint_choices(s)).empty
    assert views.stage_timeline(s).empty and views.lora_runs(s) == []
    assert views.calibration_summary(s, []).empty
    assert views.first_run_state(s) == {"empty": True, "job": None}
    assert views.hypothesis_tests(s, "nope", "general")[0].empty
    assert views.intervention_table(s, "nope", "general").empty


def test_first_run_state_tracks_the_probe_job(empty_db):
    store = Store(empty_db)
    queue.submit(store, "probe", {"model": "other", "probe_sets": ["general"]})
    assert views.first_run_state(store)["job"] is None
    job_id = queue.submit(store, "probe", {"model": "smollm2", "probe_sets": ["general"]})
    state = views.first_run_state(store)
    assert state["job"]["job_id"] == job_id and state["job"]["status"] == "queued"


# -- figures -------------------------------------------------------------------------------
def test_figures_build(store, observatory_db):
    sel = views.checkpoint_choices(store, study_id=observatory_db["study_id"])
    spec, fits, lines = views.spectrum_panel(store, "general", 1, sel)
    fig = figures.spectra_figure(spec, lines, fits, 1)
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"
    assert len(fig.data) == 2 * len(sel), "one spectrum + one fit line per checkpoint"
    curves = views.stage_curves(store, "effective_rank", "general", [BASE, REPLAY])
    side = figures.stage_curves_figure(curves, "erank", True)
    assert len(side.data) == 6
    assert [t.xaxis for t in side.data] == ["x"] * 3 + ["x2"] * 3, "one panel per run"
    over = figures.stage_curves_figure(curves, "erank", False)
    assert {t.xaxis for t in over.data} == {"x"} and {t.line.dash for t in over.data} == {
        "solid", "dash"}  # fmt: skip
    depth = views.depth_curves(store, "effective_rank", "general", [BASE, REPLAY])
    assert [t.xaxis for t in figures.depth_curves_figure(depth, "erank").data] == ["x"] * 3 + [
        "x2"] * 3  # fmt: skip
    long = views.outcome_across_stages(store, [BASE])
    assert {t.xaxis for t in figures.outcomes_figure(long, {}).data} == {"x", "x2"}
    timeline = views.stage_timeline(store, study_id=observatory_db["study_id"])
    assert len(figures.timeline_figure(timeline).data) == 3, "one bar trace per stage name"
    empty = figures.stage_curves_figure(curves.iloc[:0], "erank")
    assert empty.layout.annotations[0].text.startswith("no ")


# -- embeddings ----------------------------------------------------------------------------
def test_embedding_key_and_cached_maps(store, observatory_db):
    spec = observatory_db["stage_embedding"]
    key = embeddings.embedding_key(store, spec)
    assert key == embeddings.embedding_key(store, spec) and embeddings.is_cached(store, key)
    other = embeddings.EmbeddingSpec(**{**spec.to_dict(), "probe_sets": ("general",),
                                        "layers": (), "method": "aligned_umap"})  # fmt: skip
    assert embeddings.embedding_key(store, other) != key
    assert not embeddings.is_cached(store, embeddings.embedding_key(store, other))
    emb = embeddings.load_embedding(store, spec)
    assert emb["slice"].unique().tolist() == ["0:base", "1:sft", "2:math"]
    per_slice = emb.groupby("slice_index")["token_id"].apply(set)
    assert all(s == per_slice.iloc[0] for s in per_slice), "same tokens in every stage"
    assert {"token", "prompt", "domain", "x", "y"} <= set(emb.columns)
    layers = embeddings.load_embedding(store, observatory_db["layer_embedding"])
    assert layers["slice"].unique().tolist() == ["L0", "L1", "L2"]
    assert set(layers["probe_set"]) == {"general", "math"}
    assert len(figures.embedding_paths_figure(emb, "domain").data) >= 2
    facets = figures.embedding_facets_figure(layers, "probe_set")
    assert len(facets.data) == 6


def test_embedding_spec_round_trip_and_errors(store):
    spec = embeddings.EmbeddingSpec(mode="layers", probe_sets=("math",), checkpoint_id="x",
                                    layers=(2, 0))  # fmt: skip
    assert embeddings.EmbeddingSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    from collapse_core.errors import CollapseError

    with pytest.raises(CollapseError, match="no probe on math"):
        embeddings.resolve(store, spec)
    with pytest.raises(CollapseError, match="needs a run"):
        embeddings.resolve(store, embeddings.EmbeddingSpec(mode="stages"))
    with pytest.raises(CollapseError, match="unknown embedding method"):
        embeddings.resolve(store, embeddings.EmbeddingSpec(method="tsne"))
    assert embeddings.default_layers(31) == [0, 4, 9, 13, 17, 21, 26, 30]
    assert embeddings.default_layers(3) == [0, 1, 2]


def test_embedding_job_runs_and_caches(observatory_db_copy):
    store = Store(observatory_db_copy["db"])
    spec = embeddings.EmbeddingSpec(mode="stages", probe_sets=("general", "math"),
                                    run_id=REPLAY, layer=2, method="pca")  # fmt: skip
    key = embeddings.embedding_key(store, spec)
    job_id = embeddings.submit(store, spec)
    assert embeddings.submit(store, spec) == job_id, "no duplicate while queued"
    job = worker.claim_next(store)
    assert worker.run_job(store, job) == "done"
    row = queue.get_job(store, job_id)
    assert json.loads(row["result_json"])["embedding_key"] == key and row["progress"] == 1.0
    emb = embeddings.load_embedding(store, spec)
    assert emb["slice_index"].nunique() == 3 and set(emb["probe_set"]) == {"general", "math"}
    n = emb.groupby("slice_index").size()
    assert n.nunique() == 1 and n.iloc[0] == 128, "64 sampled tokens per probe set"
    # a second job is a cache hit
    job_id2 = embeddings.submit(store, spec)
    assert job_id2 != job_id
    assert worker.run_job(store, worker.claim_next(store)) == "done"
    assert json.loads(queue.get_job(store, job_id2)["result_json"])["cached"] is True


@pytest.mark.skipif(not os.environ.get("COLLAPSE_SLOW_TESTS"),
                    reason="AlignedUMAP compiles with numba for ~30 s; set COLLAPSE_SLOW_TESTS=1")  # fmt: skip
def test_aligned_umap_embedding(observatory_db_copy):
    store = Store(observatory_db_copy["db"])
    spec = embeddings.EmbeddingSpec(mode="stages", probe_sets=("general",), run_id=BASE, layer=2,
                                    n_neighbors=8, method="aligned_umap")  # fmt: skip
    result = embeddings.compute_embedding(store, spec)
    emb = embeddings.load_embedding(store, spec)
    assert result["slices"] == 3 and len(emb) == 3 * 64
    assert np.isfinite(emb[["x", "y"]].to_numpy()).all()
    # aligned: a token moves less between consecutive stages than two random tokens lie apart
    xy = {i: g.set_index("token_id")[["x", "y"]] for i, g in emb.groupby("slice_index")}
    step = np.linalg.norm(xy[1].to_numpy() - xy[0].loc[xy[1].index].to_numpy(), axis=1).mean()
    pts = xy[1].to_numpy()
    spread = np.linalg.norm(pts[:, None] - pts[None], axis=-1).mean()
    assert step < spread


def test_study_label_names_the_model_of_runs_and_of_tracked_series():
    when = "2026-12-01 10:00"
    assert views.study_label("s", '{"run": {"model": "/m/SmolLM2/"}}', when, "baseline") == (
        "s · SmolLM2 · 2026-12-01 10:00 · baseline"
    )
    assert " · base-model · " in views.study_label("t", '{"track": {"base": "/x/base-model"}}',
                                                   when, "track")  # fmt: skip
    assert " · tracked series · " in views.study_label("t", '{"track": {"base": null}}', when, "")
    assert " · model unknown · " in views.study_label("o", "{}", when, "baseline")
    assert " · model unknown · " in views.study_label("o", "not json", when, "baseline")


def test_verdict_table_blanks_rho_only_where_the_pair_is_not_testable():
    base = {"collapse_metric": "effective_rank", "layer": "mid", "outcome": "ood_accuracy",
            "verdict": "inconclusive", "reason": "", "within_rho": 0.4, "ci_low": 0.1,
            "ci_high": 0.7, "p_perm": 0.2, "q_value": 0.3, "fe_beta": 0.2, "pooled_rho": 0.3}  # fmt: skip
    tests = pd.DataFrame([{**base, "n_lineages": 3, "n_within": 5},
                          {**base, "n_lineages": 2, "n_within": 9, "outcome": "ood_ece"}])  # fmt: skip
    table = views.verdict_table(tests, "mid")
    assert table["ρ_w"].tolist()[0] == 0.4 and np.isnan(table["ρ_w"].tolist()[1])
    assert table["outcome"].tolist() == ["OOD accuracy", "OOD ECE"]
    assert [views.testable(r) for _, r in tests.iterrows()] == [True, False]
