"""Beyond one process: run claims, natural keys, result segments + ingest, the Ray executor.

The Ray tests start a private 2-CPU Ray cluster on this machine and run 2 seeds × 2 arms of
``configs/quick.toml`` (first two stages) on the tiny model, with one worker killed mid-run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import contextmanager
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


def _same_stored_metrics(local: Store, ray_store: Store) -> int:
    """Assert both executors stored the same stages and metrics; returns the stage count."""
    stages = "SELECT run_id, stage_index, stage, checkpoint_id, steps FROM stages ORDER BY 1, 2"
    pd.testing.assert_frame_equal(local.query(stages), ray_store.query(stages))
    for table, key, value in COMPARED:
        a, b = _frame(local, table, key, value), _frame(ray_store, table, key, value)
        assert len(a) == len(b) > 0, table
        pd.testing.assert_frame_equal(a[key], b[key], obj=table)
        np.testing.assert_allclose(a[value].to_numpy(float), b[value].to_numpy(float),
                                   rtol=1e-6, atol=1e-9, err_msg=table)  # fmt: skip
    return len(local.query(stages))


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


@contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in old.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """One private 2-CPU Ray cluster for every Ray test of this module (start-up is slow);
    its workers inherit a scratch COLLAPSE_DATA."""
    pytest.importorskip("ray")
    from collapse_core.distributed import start_local_cluster

    ray = import_ray()
    with _env(COLLAPSE_DATA=str(tmp_path_factory.mktemp("ray_workers"))):
        start_local_cluster(num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_sweep(ray_cluster, tiny_dir, tmp_path_factory):
    """The same sweep as Ray tasks on a 2-CPU local cluster; the worker of run 1 dies with
    os._exit right after committing stage 1 (first attempt only) and must be retried."""
    from collapse_core.distributed import run_study_ray

    data = tmp_path_factory.mktemp("ray_sweep")
    # the driver passes the fault spec to its tasks' workers
    with _env(COLLAPSE_DATA=str(data), **{FAULT_ENV: "1:1"}):
        store = Store(data / "ray.duckdb")
        lines: list[str] = []
        study_id = run_study_ray(_sweep_config(tiny_dir), store, data / "results", log=lines.append)
    return store, study_id, data / "results", lines


def test_ray_sweep_matches_local_executor(local_sweep, ray_sweep):
    local, local_study = local_sweep
    ray_store, ray_study, _, _ = ray_sweep
    assert ray_study == local_study
    assert _same_stored_metrics(local, ray_store) == 4 * 3
    assert set(ray_store.query("SELECT status FROM runs")["status"]) == {"done"}
    assert ray_store.query("SELECT count(*) AS n FROM run_claims")["n"][0] == 0  # released
    assert all(n == 0 for n in _duplicates(ray_store).values())
    table = stage_table(ray_store, ray_study)
    assert len(table) == 12
    assert set(compare_arms(ray_store, ray_study, n_boot=20)["arm"]) == {"replay"}
    queued = ray_store.query("SELECT kind FROM jobs")
    assert (queued["kind"] == "embedding").sum() >= 1  # the driver queued the trajectory maps


def test_reused_base_evals_keep_their_items_and_intervals(local_sweep):
    """The second arm of a seed reuses the first arm's stage-0 evals: n and the interval
    travel with the value (a copy of the value alone would leave them NULL)."""
    store, _ = local_sweep
    base = store.query(
        "SELECT r.seed, r.run_id, e.eval, e.metric, e.value, e.n, e.ci_low, e.ci_high, "
        "e.ci_method FROM evals e JOIN runs r USING (run_id) WHERE e.stage = '0:base' "
        "ORDER BY r.seed, e.eval, e.metric, r.run_id"
    )
    assert base["run_id"].nunique() == 4 and base["ci_method"].notna().sum() > 0
    cols = ["value", "n", "ci_low", "ci_high", "ci_method"]
    for _, group in base.groupby(["seed", "eval", "metric"]):
        assert len(group) == 2
        first, second = group[cols].iloc[0], group[cols].iloc[1]
        assert first.fillna(-1).tolist() == second.fillna(-1).tolist(), group


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
    from collapse_core import cli

    fresh = tmp_path / "fresh.duckdb"  # a mistyped folder: one line, and no database made
    assert cli.main(["ingest", str(tmp_path / "no-such-folder"), "--db", str(fresh)]) == 2
    assert not fresh.exists()


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


def test_a_zombie_owner_is_gone_for_claims_and_reaping(tmp_path):
    """One pid check (collapse_core.processes) for claims and reaping: an exited child its
    parent has not reaped yet (a zombie, as after kill -9) owns nothing."""
    import time

    from collapse_core.processes import pid_alive

    child = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 30
        while Path(f"/proc/{child.pid}/stat").read_text().split(")")[-1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child never exited"
            time.sleep(0.01)
        assert not pid_alive(child.pid)
        assert pid_alive(os.getpid()) and not pid_alive(None) and not pid_alive("x")
        store = Store(tmp_path / "claims.duckdb")
        assert try_claim(store, "run-z", owner="one").held
        store.execute("UPDATE run_claims SET pid = ? WHERE run_id = 'run-z'", [child.pid])
        assert try_claim(store, "run-z", owner="two").held
    finally:
        child.wait()


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


# -- failures release their claims; track and multi-model probes on Ray ----------------------
def _no_stale_owners(store: Store) -> None:
    assert store.query("SELECT count(*) AS n FROM run_claims")["n"][0] == 0
    assert "running" not in set(store.query("SELECT status FROM runs")["status"])


def test_failed_ray_sweep_releases_its_runs(ray_cluster, tiny_dir, tmp_path):
    """A run whose worker dies with no retries left is ingested up to its last committed
    stage, marked failed, and its claim dropped: nothing stays 'running' or owned."""
    from collapse_core.distributed import run_study_ray

    raw = load_config(QUICK).raw
    raw["run"].update(stages=["sft"], seeds=[0], model=str(tiny_dir))
    config = parse_config(raw)
    store = Store(tmp_path / "failed.duckdb")
    with _env(COLLAPSE_DATA=str(tmp_path), **{FAULT_ENV: "0"}):
        with pytest.raises(CollapseError, match="1 of 1 runs failed"):
            run_study_ray(config, store, tmp_path / "results", max_retries=0)
    assert list(store.query("SELECT status FROM runs")["status"]) == ["failed"]
    assert list(store.query("SELECT stage_index FROM stages")["stage_index"]) == [0]
    _no_stale_owners(store)


TRACK_PROBE = {"max_length": 24, "n_samples": 64, "batch_size": 16, "max_prompts": 12}


def _series(folder: Path) -> list[Path]:
    """Three full-weight checkpoints of one tiny llama, moved further at every step."""
    import torch

    out = []
    for step in (5, 20, 100):
        model, tok = make_tiny_model("llama", seed=0)
        gen = torch.Generator().manual_seed(99)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(step / 100 * 0.05 * torch.randn(p.shape, generator=gen))
        path = folder / f"checkpoint-{step}"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out.append(path)
    return out


def _track_settings():
    from collapse_core.probing import ProbeConfig
    from collapse_core.track import TrackSettings

    return TrackSettings(probe_sets=("math",), probe=ProbeConfig(**TRACK_PROBE), device="cpu",
                         evaluate=True, data_source="sample",
                         eval_settings={"n_heldout": 2, "n_ood": 4, "plasticity_steps": 1,
                                        "plasticity_n": 4})  # fmt: skip


def test_track_on_ray_equals_local_and_reingest_changes_nothing(ray_cluster, tmp_path):
    """`track --executor ray` (one task per checkpoint, with evals and weight-update metrics)
    stores what a local track stores; ingesting its segments again changes nothing."""
    from collapse_core import track
    from collapse_core.distributed import track_ray

    run = tmp_path / "run"
    _series(run)
    entries = track.series_entries([run], None)
    local = Store(tmp_path / "local.duckdb")
    track.track(entries, "ray run", local, _track_settings())
    ray_store = Store(tmp_path / "ray.duckdb")
    with _env(COLLAPSE_DATA=str(tmp_path / "data")):
        out = track_ray(entries, "ray run", ray_store, _track_settings(), tmp_path / "results")
    assert [s.index for s in out] == [0, 1, 2] and not any(s.cached for s in out)
    assert _same_stored_metrics(local, ray_store) == 3
    angles = ray_store.query("SELECT DISTINCT other_stage FROM lora_metrics "
                             "WHERE metric = 'principal_angle_mean'")  # fmt: skip
    assert set(angles["other_stage"]) == {"1:checkpoint-20"}  # ΔW_{k-1} rebuilt in the task
    assert list(ray_store.query("SELECT status FROM runs")["status"]) == ["done"]
    _no_stale_owners(ray_store)
    before = ray_store.table_hashes()
    again = ingest_folder(ray_store, tmp_path / "results")
    assert again.applied == 0 and again.skipped == 3
    assert ray_store.table_hashes() == before
    print(f"track segments {folder_bytes(tmp_path / 'results') / 1e6:.2f} MB, "
          f"db {ray_store.path.stat().st_size / 1e6:.2f} MB")  # fmt: skip


def test_failed_checkpoint_on_ray_stops_the_series_and_releases_it(ray_cluster, tmp_path):
    from collapse_core import track
    from collapse_core.distributed import track_ray

    good, _, _ = _series(tmp_path / "src")
    broken = tmp_path / "broken" / "checkpoint-50"
    broken.mkdir(parents=True)
    (broken / "config.json").write_text((good / "config.json").read_text())  # no weights
    entries = track.series_entries([good, broken], None)
    store = Store(tmp_path / "ray.duckdb")
    settings = track.TrackSettings(probe_sets=("math",), device="cpu",
                                   probe=_track_settings().probe)  # fmt: skip
    with pytest.raises(CollapseError, match=r"checkpoint 1 \(checkpoint-50\) failed on Ray"):
        track_ray(entries, "broken", store, settings, tmp_path / "results", max_retries=0)
    assert list(store.query("SELECT stage_index FROM stages")["stage_index"]) == [0]
    assert list(store.query("SELECT status FROM runs")["status"]) == ["failed"]
    _no_stale_owners(store)


def test_multi_model_probe_on_ray_equals_local(ray_cluster, tmp_path, capsys):
    """`probe A B --executor ray`: one task per model, one segment per probe, the same stored
    rows as the local command; a repeat is a cache hit and a re-ingest changes nothing."""
    from collapse_core import cli

    models = []
    for arch, seed in (("llama", 3), ("gpt2", 4)):
        make_tiny_model(arch, path=tmp_path / arch, seed=seed)
        models.append(str(tmp_path / arch))
    size = [f"--{k.replace('_', '-')}={v}" for k, v in TRACK_PROBE.items()]
    common = [*models, "--probe-set", "math", "--probe-set", "general", "--device", "cpu", *size]
    results = tmp_path / "results"
    assert cli.main(["probe", *common, "--db", str(tmp_path / "local.duckdb")]) == 0
    ray_args = ["probe", *common, "--db", str(tmp_path / "ray.duckdb"), "--executor", "ray",
                "--results", str(results)]  # fmt: skip
    assert cli.main(ray_args) == 0
    assert "2 model(s) submitted to Ray" in capsys.readouterr().out
    local, ray_store = Store(tmp_path / "local.duckdb"), Store(tmp_path / "ray.duckdb")
    for sql in (
        "SELECT probe_key, layer, metric, value FROM layer_metrics ORDER BY 1, 2, 3",
        "SELECT probe_key, layer, idx, eigenvalue FROM spectra ORDER BY 1, 2, 3",
        "SELECT probe_key, checkpoint_id, probe_set, n_tokens FROM probes ORDER BY 1",
        "SELECT checkpoint_id, name, n_layers, run_id FROM checkpoints ORDER BY 1",
        "SELECT probe_key, sample_idx, token_id FROM token_samples ORDER BY 1, 2",
    ):
        a, b = local.query(sql), ray_store.query(sql)
        assert len(a) > 0, sql
        pd.testing.assert_frame_equal(a, b, obj=sql)
    assert len(find_segments(results)) == 4
    before = ray_store.table_hashes()
    assert ingest_folder(ray_store, results).applied == 0
    assert cli.main(ray_args) == 0  # every probe stored: no task submitted
    assert "0 model(s) submitted" not in (out := capsys.readouterr().out) and "cache hit" in out
    assert ray_store.table_hashes() == before
