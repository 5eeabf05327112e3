"""Beyond one process: run claims, natural keys, result segments + ingest, the Ray executor.

The Ray tests start a private 2-CPU Ray cluster on this machine and run 2 seeds × 2 arms of
``configs/quick.toml`` (first two stages) on the tiny model, with one worker killed mid-run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest

from collapse_core import views
from collapse_core.analysis import compare_arms, stage_table
from collapse_core.distributed import FAULT_ENV, import_ray
from collapse_core.errors import CollapseError
from collapse_core.pipeline import plan_runs, run_study
from collapse_core.runclaims import try_claim
from collapse_core.runconfig import load_config, parse_config
from collapse_core.segments import find_segments, folder_bytes, ingest_folder, progress_table
from collapse_core.store import NATURAL_KEYS, SCHEMA, Store
from tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parent.parent
QUICK = REPO / "configs" / "quick.toml"
# stored metrics that must agree between executors: (table, key columns, value column)
COMPARED = [
    ("layer_metrics", ["stage_index", "run_id", "layer", "metric"], "value"),
    ("evals", ["run_id", "stage", "eval", "metric"], "value"),
    ("lora_metrics", ["run_id", "stage", "module", "metric", "other_stage"], "value"),
    ("calibration_bins", ["checkpoint_id", "eval", "bin"], "accuracy"),
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist_tiny")
    make_tiny_model("llama", path=path, seed=0)
    return path


def _sweep_config(tiny_dir: Path):
    raw = load_config(QUICK).raw
    raw["run"].update(stages=["sft", "dpo"], seeds=[0, 1], model=str(tiny_dir))
    raw["interventions"] = {"arms": ["baseline", "replay"]}
    return parse_config(raw)


def _duplicates(store: Store) -> dict[str, int]:
    out = {}
    for table, key in {**NATURAL_KEYS, "stages": ("run_id", "stage_index")}.items():
        cols = ", ".join(key)
        out[table] = int(store.query(
            f"SELECT count(*) AS n FROM (SELECT {cols} FROM {table} GROUP BY {cols} "
            "HAVING count(*) > 1)"
        )["n"][0])  # fmt: skip
    return out


def _frame(store: Store, table: str, key: list[str], value: str) -> pd.DataFrame:
    if table == "layer_metrics":
        sql = ("SELECT s.stage_index, s.run_id, m.layer, m.metric, m.value FROM layer_metrics m "
               "JOIN stages s USING (checkpoint_id)")  # fmt: skip
    else:
        sql = f"SELECT {', '.join(key)}, {value} FROM {table}"
    return store.query(sql).sort_values(key, na_position="first").reset_index(drop=True)


@pytest.fixture(scope="module")
def local_sweep(tiny_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("local_sweep")
    os.environ["COLLAPSE_DATA"] = str(data)
    try:
        store = Store(data / "local.duckdb")
        study_id = run_study(_sweep_config(tiny_dir), store)
    finally:
        os.environ.pop("COLLAPSE_DATA", None)
    return store, study_id


@pytest.fixture(scope="module")
def ray_sweep(tiny_dir, tmp_path_factory):
    """The same sweep as Ray tasks on a 2-CPU local cluster; the worker of run 1 dies with
    os._exit right after committing stage 1 (first attempt only) and must be retried."""
    pytest.importorskip("ray")
    from collapse_core.distributed import run_study_ray, start_local_cluster

    ray = import_ray()
    data = tmp_path_factory.mktemp("ray_sweep")
    old = {k: os.environ.get(k) for k in ("COLLAPSE_DATA", FAULT_ENV)}
    os.environ["COLLAPSE_DATA"] = str(data)
    os.environ[FAULT_ENV] = "1:1"  # inherited by the Ray workers started below
    try:
        start_local_cluster(num_cpus=2)
        store = Store(data / "ray.duckdb")
        lines: list[str] = []
        study_id = run_study_ray(_sweep_config(tiny_dir), store, data / "results", log=lines.append)
    finally:
        ray.shutdown()
        for key, value in old.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
    return store, study_id, data / "results", lines


def test_ray_sweep_matches_local_executor(local_sweep, ray_sweep):
    local, local_study = local_sweep
    ray_store, ray_study, _, _ = ray_sweep
    assert ray_study == local_study
    stages = "SELECT run_id, stage_index, stage, checkpoint_id, steps FROM stages ORDER BY 1, 2"
    pd.testing.assert_frame_equal(local.query(stages), ray_store.query(stages))
    assert len(local.query(stages)) == 4 * 3
    for table, key, value in COMPARED:
        a, b = _frame(local, table, key, value), _frame(ray_store, table, key, value)
        assert len(a) == len(b) > 0, table
        pd.testing.assert_frame_equal(a[key], b[key], obj=table)
        np.testing.assert_allclose(a[value].to_numpy(float), b[value].to_numpy(float),
                                   rtol=1e-6, atol=1e-9, err_msg=table)  # fmt: skip
    assert set(ray_store.query("SELECT status FROM runs")["status"]) == {"done"}
    assert all(n == 0 for n in _duplicates(ray_store).values())
    table = stage_table(ray_store, ray_study)
    assert len(table) == 12
    assert set(compare_arms(ray_store, ray_study, n_boot=20)["arm"]) == {"replay"}
    queued = ray_store.query("SELECT kind FROM jobs")
    assert (queued["kind"] == "embedding").sum() >= 1  # the driver queued the trajectory maps


def test_killed_worker_was_retried_and_resumed(ray_sweep, tiny_dir):
    _, study_id, results, _ = ray_sweep
    killed = plan_runs(_sweep_config(tiny_dir))[1]
    folder = results / study_id / killed.run_id
    assert (folder / ".fault-fired").exists()
    status = json.loads((folder / "status.json").read_text())
    assert status["attempt"] == 2 and status["state"] == "done"
    metas = [json.loads((seg / "meta.json").read_text()) for seg in find_segments(folder)]
    assert [(m["stage_index"], m["attempt"]) for m in metas] == [(0, 1), (1, 1), (2, 2)]
    progress = progress_table(results)
    assert len(progress) == 4 and set(progress["state"]) == {"done"}
    assert (progress["stages_done"] == 3).all()
    assert views.ray_progress(results).equals(progress)


def test_ingest_twice_changes_nothing(ray_sweep, tmp_path):
    ray_store, _, results, _ = ray_sweep
    before = ray_store.table_hashes()
    again = ingest_folder(ray_store, results)
    assert again.applied == 0 and again.skipped == 12
    assert ray_store.table_hashes() == before
    db = tmp_path / "fresh.duckdb"
    cmd = [sys.executable, "-m", "collapse_core", "ingest", str(results), "--db", str(db)]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "12 segment(s) ingested" in first.stdout
    fresh = Store(db)
    hashes = fresh.table_hashes()
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert "0 segment(s) ingested, 12 already present" in second.stdout
    assert fresh.table_hashes() == hashes
    for table in ("layer_metrics", "evals", "stages", "token_vectors", "generations"):
        assert hashes[table] == before[table], table
    print(f"segments {folder_bytes(results) / 1e6:.2f} MB (incl. merged checkpoints), "
          f"db after ingest {db.stat().st_size / 1e6:.2f} MB")  # fmt: skip


def test_ingest_rejects_a_bad_segment(tmp_path):
    seg = tmp_path / "study-x" / "run-x" / "stage-000"
    seg.mkdir(parents=True)
    (seg / "meta.json").write_text('{"format": 99}')
    store = Store(tmp_path / "db.duckdb")
    before = store.table_hashes()
    with pytest.raises(CollapseError, match="unsupported segment format"):
        ingest_folder(store, tmp_path)
    (seg / "meta.json").write_text(
        json.dumps({"format": 1, "run_id": "r", "stage_index": 0, "checkpoint_id": "c"})
    )
    (seg / "evil.parquet").write_bytes(b"x")
    with pytest.raises(CollapseError, match="unexpected table"):
        ingest_folder(store, tmp_path)
    assert store.table_hashes() == before


def test_two_processes_on_one_config_commit_each_stage_once(tiny_dir, tmp_path):
    """Two `run configs/quick.toml` at once on one DB (baseline + replay arms): each process
    claims a run, neither stage is stored twice, and `analyze` works afterwards."""
    db = tmp_path / "both.duckdb"
    env = {**os.environ, "COLLAPSE_DATA": str(tmp_path / "data")}
    cmd = [sys.executable, "-m", "collapse_core", "run", str(QUICK), "--db", str(db),
           "--model", str(tiny_dir), "--compare", "baseline,replay"]  # fmt: skip
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]  # fmt: skip
    outputs = [p.communicate(timeout=1800)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    store = Store(db)
    stages = store.query("SELECT run_id, stage_index FROM stages")
    assert len(stages) == 2 * 7
    assert all(n == 0 for n in _duplicates(store).values())
    assert store.query("SELECT count(*) AS n FROM run_claims")["n"][0] == 0
    assert any("being run by pid" in out for out in outputs)  # the second process waited
    analyze = subprocess.run([sys.executable, "-m", "collapse_core", "analyze", "--db", str(db)],
                             cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
    assert analyze.returncode == 0, analyze.stderr[-2000:]
    assert "intervention arms vs baseline" in analyze.stdout


def test_claims_are_exclusive_until_stale(tmp_path):
    store = Store(tmp_path / "claims.duckdb")
    first = try_claim(store, "run-a", owner="one")
    assert first.held
    second = try_claim(store, "run-a", owner="two")
    assert not second.held and "pid" in second.holder
    # an owner process that is gone (kill -9) leaves a claim the next process takes over
    store.execute("UPDATE run_claims SET pid = 2147483646 WHERE run_id = 'run-a'")
    assert try_claim(store, "run-a", owner="two").held


STAGE_COLUMNS = (
    "run_id, stage_index, stage, checkpoint_id, adapter_path, steps, "
    "train_loss_first, train_loss_last, seconds, created_at"
)


def test_old_database_is_deduplicated_and_keyed(tmp_path):
    path = tmp_path / "v1.duckdb"
    con = duckdb.connect(str(path))
    con.execute(SCHEMA)
    row = "('run-a', 1, 'sft', 'c1', NULL, 3, 1.0, 0.5, 2.0, now())"
    con.execute(f"INSERT INTO stages VALUES {row}, {row}")
    con.execute("INSERT INTO evals VALUES ('run-a', 'c1', '1:sft', 'ood', 'ece', 0.1), "
                "('run-a', 'c1', '1:sft', 'ood', 'ece', 0.1)")  # fmt: skip
    con.close()
    store = Store(path)
    assert len(store.query("SELECT * FROM stages")) == 1
    assert len(store.query("SELECT * FROM evals")) == 1
    with pytest.raises(duckdb.ConstraintException):
        store.execute(f"INSERT INTO stages ({STAGE_COLUMNS}) VALUES {row}")
    assert store.query("SELECT value FROM meta WHERE key = 'schema_version'")["value"][0] == "2"


def test_ray_executor_without_ray_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(CollapseError, match=r"pip install 'ray==2\.60\.0'"):
        import_ray()


def test_gpu_check_says_why_it_cannot_run_here():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: run scripts/gpu_check.sh for real")
    out = subprocess.run(["bash", "scripts/gpu_check.sh"], cwd=REPO, capture_output=True,
                         text=True)  # fmt: skip
    assert out.returncode == 2 and "no CUDA device" in out.stderr


def test_batch_size_follows_free_memory():
    from collapse_core.devtools.bench_gpu import batch_size_for_memory

    gib = 2**30
    small = batch_size_for_memory(4 * gib, 30, 576, 64, 49152, 2)
    large = batch_size_for_memory(80 * gib, 30, 576, 64, 49152, 2)
    assert 1 <= small < large <= 256 and large & (large - 1) == 0
    assert batch_size_for_memory(16 * gib, 30, 576, 128, 49152, 2, training=True) < large
    assert batch_size_for_memory(1, 30, 576, 64, 49152, 2) == 1


def test_runs_page_shows_ray_progress(ray_sweep, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    _, _, results, _ = ray_sweep
    monkeypatch.setenv("COLLAPSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("COLLAPSE_DB", str(tmp_path / "app.duckdb"))
    monkeypatch.setenv("COLLAPSE_NO_AUTOPROBE", "1")
    at = AppTest.from_file(str(REPO / "pages" / "runs.py"), default_timeout=60)
    at.session_state["ray_results_dir"] = str(results)
    at.run()
    assert not at.exception, at.exception
    assert any("Ray runs (0 running)" in s.value for s in at.subheader)
    runs = [m.value for m in at.markdown if "attempt" in m.value]
    assert len(runs) == 4 and any("attempt 2" in r for r in runs)
    texts = [p.proto.text for p in at.get("progress")]
    assert sum("3/3 stages" in t for t in texts) == 4
