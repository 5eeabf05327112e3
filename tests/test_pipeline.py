"""The sequential pipeline on a tiny model with the in-repo data samples (configs/quick.toml)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from collapse_core import views
from collapse_core.analysis import compare_arms, correlate, stage_table
from collapse_core.errors import CollapseError
from collapse_core.pipeline import plan_runs, run_study
from collapse_core.runconfig import load_config, parse_config
from collapse_core.store import Store
from tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "configs" / "quick.toml"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipeline_tiny")
    make_tiny_model("llama", path=path, seed=0)
    return path


@pytest.fixture(scope="module")
def quick_study(tiny_dir, tmp_path_factory):
    """One full quick study (all six stages), shared by the assertions below."""
    data = tmp_path_factory.mktemp("data")
    os.environ["COLLAPSE_DATA"] = str(data)
    try:
        config = load_config(QUICK)
        config.model = str(tiny_dir)
        store = Store(data / "quick.duckdb")
        study_id = run_study(config, store)
    finally:
        os.environ.pop("COLLAPSE_DATA", None)
    return store, study_id, config


def test_every_stage_is_probed_and_evaluated(quick_study):
    store, study_id, config = quick_study
    stages = store.query("SELECT stage_index, stage, checkpoint_id FROM stages ORDER BY 1")
    assert list(stages["stage"]) == ["base", *config.orders[0]]
    assert stages["checkpoint_id"].nunique() == 7  # every stage changed the weights
    for ckpt in stages["checkpoint_id"]:
        n = store.query(
            "SELECT count(DISTINCT layer) AS n FROM layer_metrics WHERE checkpoint_id = ?", [ckpt]
        )["n"][0]
        assert n == 3
    evals = store.query("SELECT DISTINCT eval, metric FROM evals")
    pairs = set(zip(evals["eval"], evals["metric"], strict=True))
    for needed in [("ood", "accuracy"), ("ood", "ece"), ("plasticity", "auc"),
                   ("dpo", "preference_accuracy"), ("safety", "refusal_rate"),
                   ("safety", "over_refusal_rate"), ("safety", "refusal_margin_harmful"),
                   ("math", "answer_accuracy"),
                   ("code", "heldout_loss"), ("code", "pass_at_1"),
                   ("safety", "generated_refusal_rate")]:  # fmt: skip
        assert needed in pairs, needed
    # Every item-based score carries its item count and a 95 % interval around the value.
    ood = store.query("SELECT * FROM evals WHERE eval = 'ood'")
    assert set(ood["n"]) == {config.eval.n_ood}
    boxed = ood[ood["metric"] != "mce"]  # MCE, a maximum over bins, gets no interval
    assert ood.loc[ood["metric"] == "mce", "ci_method"].isna().all()
    assert (boxed["ci_low"] <= boxed["value"] + 1e-12).all()
    assert (boxed["value"] <= boxed["ci_high"] + 1e-12).all()
    acc = ood[ood["metric"] == "accuracy"]
    assert set(acc["ci_method"]) == {"Wilson score interval over items"}
    assert set(ood.loc[ood["metric"] == "ece", "ci_method"]) == {"item bootstrap, basic interval"}
    with_ci = store.query("SELECT DISTINCT eval, metric FROM evals WHERE ci_method IS NOT NULL")
    assert {("dpo", "preference_accuracy"), ("math", "answer_accuracy"), ("code", "pass_at_1"),
            ("code", "heldout_loss"), ("safety", "refusal_rate")} <= set(
        zip(with_ci["eval"], with_ci["metric"], strict=True))  # fmt: skip
    plast = store.query("SELECT n, ci_low, ci_method FROM evals WHERE eval = 'plasticity'")
    assert set(plast["n"]) == {config.eval.plasticity_steps}
    assert plast["ci_method"].isna().all()  # one training run: no interval claimed
    bins = store.query("SELECT count(*) AS n FROM calibration_bins")["n"][0]
    assert bins == 7 * 15
    gens = store.query("SELECT checkpoint_id, count(*) AS n FROM generations "
                       "WHERE eval = 'code_pass_at_1' GROUP BY 1")  # fmt: skip
    assert len(gens) == 7 and gens["n"].nunique() == 1 and gens["n"].iloc[0] >= 1
    statuses = store.query("SELECT DISTINCT eval, status FROM generations")
    assert set(zip(statuses["eval"], statuses["status"], strict=True)) <= {
        ("code_pass_at_1", s) for s in ("passed", "failed", "timeout")
    } | {("safety_refusal", s) for s in ("refused", "answered")}
    answers = views.generations(store, study_id, eval_name="safety_refusal")
    assert len(answers) >= 7 and set(answers["item_id"].str.split("-").str[0]) == {
        "harmful",
        "benign",
    }
    shown = views.generations(store, study_id)
    assert len(shown) == gens["n"].sum() and shown["stage_label"].iloc[0] == "0:base"
    lora = store.query("SELECT DISTINCT stage, metric FROM lora_metrics")
    assert {"effective_rank", "subspace_overlap"} <= set(lora["metric"])
    assert lora["stage"].nunique() == 6
    methods = store.query("SELECT stage_index, method FROM stages ORDER BY 1")["method"]
    assert pd.isna(methods.iloc[0]) and set(methods.iloc[1:]) == {"lora"}
    assert set(store.query("SELECT method FROM runs")["method"]) == {"lora"}
    queued = store.query("SELECT kind, status FROM jobs")
    assert ("embedding", "queued") in set(zip(queued["kind"], queued["status"], strict=True))
    table = stage_table(store, study_id)
    assert len(table) == 7 and table["plasticity_auc_rel"].iloc[0] == pytest.approx(1.0)


def test_rerun_is_a_no_op(quick_study):
    store, study_id, config = quick_study
    before = store.table_hashes()
    assert run_study(config, store) == study_id
    assert store.table_hashes() == before


def test_correlations_are_stored(quick_study):
    store, study_id, _ = quick_study
    corr = correlate(store, study_id, n_boot=50)
    assert not corr.empty
    assert set(corr["outcome"]) <= {"plasticity_auc_rel", "ood_accuracy", "ood_ece"}
    assert (corr["n_checkpoints"] == 7).all()
    assert corr["pooled_rho"].dropna().between(-1, 1).all()
    assert set(corr["verdict"]) <= {"supported", "contradicted", "inconclusive"}
    stored = store.query("SELECT count(*) AS n FROM hypothesis_tests WHERE study_id = ?",
                         [study_id])  # fmt: skip
    assert stored["n"][0] == len(corr)


def test_config_validation_rejects_bad_values():
    base = {"run": {"name": "x", "model": "smollm2", "stages": ["sft"]}}
    with pytest.raises(CollapseError, match="unknown stage 'pretrain'"):
        parse_config({"run": {**base["run"], "stages": ["pretrain"]}})
    with pytest.raises(CollapseError, match="steps = -5"):
        parse_config({**base, "train": {"steps": -5}})
    with pytest.raises(CollapseError, match="steps = 10000000"):
        parse_config({**base, "train": {"steps": 10_000_000}})
    with pytest.raises(CollapseError, match="generation_n = -1"):
        parse_config({**base, "eval": {"generation_n": -1}})
    with pytest.raises(CollapseError, match="unknown key \\[eval\\] pass_at_k"):
        parse_config({**base, "eval": {"pass_at_k": 5}})
    with pytest.raises(CollapseError, match="unknown intervention 'dropout'"):
        parse_config({**base, "interventions": {"arms": ["baseline", "dropout"]}})
    config = parse_config({"run": {"name": "x", "model": "smollm2", "seeds": [0, 1],
                                   "orders": [["sft", "math"], ["math", "sft"]]}})  # fmt: skip
    assert len(plan_runs(config)) == 4


def test_kill_mid_run_then_resume(tiny_dir, tmp_path):
    """kill -9 during a stage: the DB opens, finished stages stay, the rerun completes."""
    db = tmp_path / "kill.duckdb"
    env = {**os.environ, "COLLAPSE_DATA": str(tmp_path / "data")}
    cmd = [sys.executable, "-m", "collapse_core", "run", str(QUICK), "--db", str(db),
           "--model", str(tiny_dir)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 240
    done = 0
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        if db.exists():
            try:
                done = len(Store(db, lock_timeout=5).query("SELECT stage FROM stages"))
            except CollapseError:
                continue
            if done >= 3:
                break
    assert proc.poll() is None, "run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = Store(db)
    killed_at = store.query("SELECT stage_index FROM stages ORDER BY 1")["stage_index"].tolist()
    assert killed_at == list(range(len(killed_at))) and len(killed_at) >= 3
    # no half-written probe: every probe row has its metrics
    orphans = store.query(
        "SELECT count(*) AS n FROM probes p WHERE NOT EXISTS "
        "(SELECT 1 FROM layer_metrics m WHERE m.probe_key = p.probe_key)"
    )["n"][0]
    assert orphans == 0
    rerun = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming after stage" in rerun.stdout + rerun.stderr
    final = store.query("SELECT stage_index FROM stages ORDER BY 1")["stage_index"].tolist()
    assert final == list(range(7))


def test_same_config_and_seed_give_identical_metrics(tiny_dir, tmp_path, quick_study):
    """Determinism: a second study in a fresh DB reproduces the metrics (tolerance 1e-6 rel)."""
    store_a, _, config = quick_study
    os.environ["COLLAPSE_DATA"] = str(tmp_path / "data")
    try:
        store_b = Store(tmp_path / "again.duckdb")
        config_b = load_config(QUICK)
        config_b.model = str(tiny_dir)
        config_b.eval.n_ood = config.eval.n_ood
        run_study(config_b, store_b)
    finally:
        os.environ.pop("COLLAPSE_DATA", None)
    sql = ("SELECT s.stage_index, m.layer, m.metric, m.value FROM layer_metrics m JOIN stages s "
           "USING (checkpoint_id) ORDER BY 1, 2, 3")  # fmt: skip
    a, b = store_a.query(sql), store_b.query(sql)
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a["value"].to_numpy(), b["value"].to_numpy(), rtol=1e-6, atol=1e-9)


def test_compare_arms_produces_deltas(tiny_dir, tmp_path):
    os.environ["COLLAPSE_DATA"] = str(tmp_path / "data")
    try:
        raw = load_config(QUICK).raw
        raw["run"]["stages"] = ["sft", "math"]
        raw["run"]["model"] = str(tiny_dir)
        raw["interventions"] = {"arms": ["baseline", "replay", "olora"]}
        config = parse_config(raw)
        store = Store(tmp_path / "arms.duckdb")
        study_id = run_study(config, store)
    finally:
        os.environ.pop("COLLAPSE_DATA", None)
    table = compare_arms(store, study_id, n_boot=20)
    assert set(table["arm"]) == {"replay", "olora"}
    end = table[table["at"] == "end"]
    assert end["d_effective_rank_mid"].notna().all() and end["d_ood_accuracy"].notna().all()


def _full_ft_config(tiny_dir) -> object:
    """Two full fine-tuning stages (DPO, then SFT) with replay, refresh and diversity at once."""
    raw = load_config(QUICK).raw
    raw["run"] = {
        **raw["run"],
        "name": "full-ft",
        "model": str(tiny_dir),
        "stages": ["dpo", "sft"],
        "keep_all": True,
    }  # stage 1's weights stay for the resume below
    raw["train"] = {**raw["train"], "method": "full", "lr": 1e-3}
    raw["eval"] = {**raw["eval"], "n_heldout": 2, "n_ood": 4, "plasticity_steps": 2,
                   "plasticity_n": 4, "probe_max_prompts": 8, "generation_n": 0,
                   "heldout_domains": "order", "queue_embeddings": False}  # fmt: skip
    raw["interventions"] = {"arms": ["replay+refresh+diversity"],
                            "refresh": {"method": "both", "rate": 0.1}}  # fmt: skip
    return parse_config(raw)


def test_full_fine_tuning_pipeline_stores_weight_update_metrics_and_resumes(tiny_dir, tmp_path):
    from safetensors.numpy import load_file

    os.environ["COLLAPSE_DATA"] = str(tmp_path / "data")
    try:
        config = _full_ft_config(tiny_dir)
        store = Store(tmp_path / "full.duckdb")
        study_id = run_study(config, store)
        (plan,) = plan_runs(config)
        stages = store.query("SELECT * FROM stages ORDER BY stage_index")
        assert list(stages["stage"]) == ["base", "dpo", "sft"]
        assert pd.isna(stages["method"].iloc[0]) and list(stages["method"].iloc[1:]) == ["full"] * 2
        assert stages["adapter_path"].isna().all()  # no adapter, no merge
        assert stages["checkpoint_id"].nunique() == 3
        assert store.query("SELECT method FROM runs")["method"].tolist() == ["full"]
        run_folder = Path(os.environ["COLLAPSE_DATA"]) / "runs" / plan.run_id
        saved = sorted(p.name for p in (run_folder / "stage2").iterdir())
        assert "model.safetensors" in saved and not [
            n for n in saved if n.endswith((".bin", ".pt"))
        ]
        deltas = load_file(str(run_folder / "stage1_dpo_delta.safetensors"))
        assert deltas and all(d.dtype == np.float32 for d in deltas.values())

        sql = ("SELECT stage, module, metric, other_stage, value FROM lora_metrics "
               "ORDER BY 1, 2, 3, 4")  # fmt: skip
        rows = store.query(sql)
        metrics = set(rows["metric"])
        assert {"effective_rank", "stable_rank", "update_rank", "intruder_dimensions",
                "intruder_dimensions_cumulative", "relative_update_norm",
                "subspace_overlap", "principal_angle_mean"} <= metrics  # fmt: skip
        assert set(rows["stage"]) == {"1:dpo", "2:sft"}
        assert set(rows["module"]) == set(deltas)  # the q/v projections LoRA would adapt
        pairs = rows[rows["other_stage"].notna()]
        assert set(pairs["stage"]) == {"2:sft"} and set(pairs["other_stage"]) == {"1:dpo"}
        ranks = rows[rows["metric"] == "update_rank"]
        assert (ranks["value"] > config.train.lora_r).all()  # full FT: beyond any LoRA rank
        assert views.stage_methods(store, plan.run_id) == {"1:dpo": "full", "2:sft": "full"}

        # Resume after stage 1: stage 2 is trained again from the saved full weights and its
        # comparison with stage 1 reads stage 1's ΔW back from the delta file.
        with store.transaction() as con:
            con.execute("DELETE FROM stages WHERE stage_index = 2")
            con.execute("DELETE FROM lora_metrics WHERE stage = '2:sft'")
            con.execute("UPDATE runs SET status = 'pending'")
        assert run_study(config, store) == study_id
        np.testing.assert_allclose(store.query(sql)["value"], rows["value"], rtol=1e-5, atol=1e-7)
    finally:
        os.environ.pop("COLLAPSE_DATA", None)


def test_old_database_reads_its_stages_as_lora(tmp_path):
    """A file from before ``method`` existed gets the column on open, filled in as LoRA."""
    import duckdb

    from collapse_core.store import SCHEMA

    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(SCHEMA)
    con.execute("INSERT INTO runs (run_id, status) VALUES ('run-a', 'done')")
    con.execute("INSERT INTO stages (run_id, stage_index, stage, adapter_path) VALUES "
                "('run-a', 0, 'base', NULL), ('run-a', 1, 'sft', '/x/stage1_sft_adapter')")  # fmt: skip
    con.close()
    store = Store(path)
    methods = store.query("SELECT method FROM stages ORDER BY stage_index")["method"]
    assert pd.isna(methods.iloc[0]) and methods.iloc[1] == "lora"
    assert store.query("SELECT method FROM runs")["method"].tolist() == ["lora"]
    assert views.stage_methods(store, "run-a") == {"1:sft": "lora"}
