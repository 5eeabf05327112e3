"""The app reading while two worker processes write: no lock error reaches the reader."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from collapse_core import views
from collapse_core.jobs import queue
from collapse_core.store import Store
from tiny_models import make_tiny_model

REPO = Path(__file__).resolve().parent.parent


def test_reads_succeed_while_two_workers_write(tmp_path):
    tiny = tmp_path / "tiny"
    make_tiny_model("llama", path=tiny, seed=0)
    store = Store(tmp_path / "shared.duckdb")
    job_ids = []
    for i in range(2):
        texts = tmp_path / f"texts{i}.txt"
        texts.write_text("\n".join(f"writer {i} prompt {k} about {k % 13}" for k in range(300)))
        job_ids.append(queue.submit(store, "probe", {
            "model": str(tiny), "probe_sets": [str(texts)], "device": "cpu",
            "config": {"batch_size": 2, "max_length": 24, "n_samples": 64},
        }))  # fmt: skip
    env = {**os.environ, "COLLAPSE_DATA": str(tmp_path / "data")}
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "collapse_core",
                "worker",
                "--db",
                str(store.path),
                "--exit-when-idle",
                "2",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        for _ in range(2)
    ]
    reads, errors = 0, []
    deadline = time.time() + 240
    try:
        while time.time() < deadline and any(w.poll() is None for w in workers):
            try:
                views.db_counts(store)
                views.jobs_table(store)
                views.checkpoint_choices(store)
                reads += 1
            except Exception as err:  # noqa: BLE001 - any error here is what the test forbids
                errors.append(f"{type(err).__name__}: {err}")
            time.sleep(0.05)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
            w.wait()
    assert not errors, errors[:3]
    assert reads > 20
    statuses = {queue.get_job(store, j)["status"] for j in job_ids}
    assert statuses == {"done"}, statuses
    assert len(store.query("SELECT probe_key FROM probes")) == 2
