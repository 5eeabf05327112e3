"""The job queue with REAL worker processes: a job runs and stores its result, cancels work
(queued and running), and a worker killed with SIGKILL mid-job leaves an openable database, an
"interrupted" job and no half-written result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collapse_core.jobs import queue, worker
from collapse_core.paths import REPO_ROOT
from collapse_core.store import Store
from tiny_models import make_tiny_model

SLOW_LINES = 5_000  # one prompt per forward pass: far longer than the test waits


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("jobs_assets")
    model = root / "tiny"
    make_tiny_model("llama", path=model, seed=0)
    slow = root / "slowset.txt"
    slow.write_text("\n".join(f"probe text number {i} for a slow job" for i in range(SLOW_LINES)))
    return {"model": str(model), "slow": str(slow)}


def _start_worker(db: Path, tmp_path: Path, idle: float = 2.0) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / "worker.log"
    env = {**os.environ, "COLLAPSE_DATA": str(tmp_path / "data"), "COLLAPSE_DB": str(db)}
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "collapse_core", "worker", "--db", str(db),
             "--exit-when-idle", str(idle)],
            cwd=REPO_ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    return proc, log


def _wait(predicate, what: str, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}; worker log:\n{log.read_text()[-3000:]}")


def _slow_spec(assets: dict) -> dict:
    return {
        "model": assets["model"], "probe_sets": [assets["slow"]], "device": "cpu",
        "config": {"batch_size": 1, "max_length": 16, "n_samples": 64},
    }  # fmt: skip


def _rows(store: Store, probe_set: str) -> int:
    df = store.query(
        "SELECT (SELECT count(*) FROM probes WHERE probe_set = $s) "
        "+ (SELECT count(*) FROM layer_metrics WHERE probe_set = $s) "
        "+ (SELECT count(*) FROM spectra WHERE probe_set = $s) AS n",
        {"s": probe_set},
    )
    return int(df["n"][0])


def _running_with_progress(store: Store, job_id: str):
    def check() -> bool:
        job = queue.get_job(store, job_id)
        return job["status"] == queue.RUNNING and (job["progress"] or 0) > 0

    return check


def test_worker_runs_job_and_honours_cancels(assets, tmp_path):
    store = Store(tmp_path / "q.duckdb")
    quick = queue.submit(store, "probe", {
        "model": assets["model"], "probe_sets": ["math"], "device": "cpu",
        "config": {"max_prompts": 12, "max_length": 24, "n_samples": 64},
    })  # fmt: skip
    queued = queue.submit(store, "probe", {"model": assets["model"], "probe_sets": ["code"]})
    queue.request_cancel(store, queued)
    assert queue.get_job(store, queued)["status"] == queue.CANCELLED
    slow = queue.submit(store, "probe", _slow_spec(assets))

    proc, log = _start_worker(store.path, tmp_path)
    try:
        _wait(_running_with_progress(store, slow), "the slow job to run", log)
        queue.request_cancel(store, slow)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-2000:]

    done = queue.get_job(store, quick)
    assert done["status"] == queue.DONE and done["progress"] == 1.0
    result = json.loads(done["result_json"])
    (key,) = result["probe_keys"]
    assert store.has_probe(key)
    assert len(store.layer_metrics(key)) > 0
    assert queue.get_job(store, queued)["status"] == queue.CANCELLED  # never started
    assert _rows(store, "code") == 0
    cancelled = queue.get_job(store, slow)
    assert cancelled["status"] == queue.CANCELLED and "cancel" in cancelled["message"]
    assert _rows(store, Path(assets["slow"]).stem) == 0


def test_kill_9_mid_job_leaves_no_partial_result(assets, tmp_path):
    from collapse_core.models import load_model
    from collapse_core.probesets import load_probe_set
    from collapse_core.probing import ProbeConfig, probe_key

    store = Store(tmp_path / "k.duckdb")
    spec = _slow_spec(assets)
    job_id = queue.submit(store, "probe", spec)
    proc, log = _start_worker(store.path, tmp_path, idle=30)
    try:
        _wait(_running_with_progress(store, job_id), "the job to run", log)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    after = Store(store.path, lock_timeout=10)  # opens: no stale lock, WAL replays
    assert queue.get_job(after, job_id)["status"] == queue.RUNNING  # nobody has noticed yet
    assert not worker.worker_alive(after)
    assert worker.reap_interrupted(after) == 1
    job = queue.get_job(after, job_id)
    assert job["status"] == queue.INTERRUPTED and "interrupted" in job["message"]
    loaded = load_model(assets["model"], device="cpu", verbose=False)
    key = probe_key(loaded.checkpoint_id, load_probe_set(assets["slow"]),
                    ProbeConfig(**spec["config"]))  # fmt: skip
    for table in ("probes", "layer_metrics", "spectra", "token_samples", "token_vectors"):
        n = after.query(f"SELECT count(*) AS n FROM {table} WHERE probe_key = ?", [key])["n"][0]
        assert n == 0, f"half-written result in {table}"
    assert _rows(after, Path(assets["slow"]).stem) == 0
    assert worker.reap_interrupted(after) == 0  # idempotent
