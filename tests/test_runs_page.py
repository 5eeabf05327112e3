"""AppTest of Runs & jobs for issue 16: true statuses, CLI runs listed, cancelling…, the one
Base model control and the time estimate (real DB rows; no worker process is started)."""

from __future__ import annotations

import datetime as dt
import json
import os

import pytest
from streamlit.testing.v1 import AppTest

from collapse_core import lifecycle
from collapse_core.jobs import queue, worker
from collapse_core.paths import REPO_ROOT
from collapse_core.store import Store, dumps
from tiny_models import make_tiny_model

PAGE = str(REPO_ROOT / "pages" / "runs.py")
DEAD_PID = 2**22 + 12345  # above the default pid_max: never a live process


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("COLLAPSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("COLLAPSE_DB", str(tmp_path / "runs.duckdb"))
    monkeypatch.setenv("COLLAPSE_NO_AUTOPROBE", "1")
    monkeypatch.delenv("COLLAPSE_READONLY", raising=False)
    monkeypatch.setattr(worker, "ensure_worker", lambda store, *a, **k: True)
    return {"db": tmp_path / "runs.duckdb", "tmp": tmp_path}


def _app() -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def _add_run(store: Store, run_id: str, name: str, pid: int, job_id: str | None = None) -> None:
    now = dt.datetime.now()
    store.execute(
        "INSERT INTO runs (run_id, study_id, name, arm, seed, stage_order, config_json, status, "
        "created_at) VALUES (?, 'study-t', ?, 'baseline', 0, 'sft,math', '{}', 'running', ?)",
        [run_id, name, now],
    )
    store.execute(
        "INSERT INTO run_claims (run_id, owner, pid, host, job_id, claimed_at, heartbeat_at, "
        "progress, message, cancel_requested) "
        "VALUES (?, 'x', ?, ?, ?, ?, ?, 0.4, 'sft: step 3/9', false)",
        [run_id, pid, __import__("socket").gethostname(), job_id, now, now],
    )


def test_cli_runs_are_listed_and_dead_ones_reaped_on_open(env):
    store = Store(env["db"])
    _add_run(store, "run-dead", "ctrl-c'd CLI run", DEAD_PID)
    _add_run(store, "run-live", "live CLI run", os.getpid())
    store.execute(
        "INSERT INTO runs (run_id, name, status) VALUES ('run-old', 'no owner', 'running')"
    )
    at = _app()
    status = dict(zip(*store.query("SELECT run_id, status FROM runs").T.values, strict=True))
    assert status == {"run-dead": "interrupted", "run-live": "running", "run-old": "interrupted"}
    text = " ".join(m.value for m in at.markdown)
    assert "live CLI run" in text and f"CLI pid {os.getpid()}" in text
    table = at.dataframe[0].value
    assert set(table["status"]) == {"interrupted"} and "ctrl-c'd CLI run" in set(table["name"])
    # Cancel on a CLI run raises its flag; the owner sees it at its next batch
    at.button(key="cancel-run-run-live").click().run()
    assert not at.exception
    claim = lifecycle.RunClaim(store, "run-live")
    claim.beat()
    assert claim.should_stop()
    assert any("cancelling" in w.value for w in at.warning)


def test_finished_run_without_a_message_shows_an_empty_cell_not_none(env):
    store = Store(env["db"])
    store.execute("INSERT INTO runs (run_id, name, status, created_at) VALUES ('run-done', "
                  "'quiet', 'done', TIMESTAMP '2026-11-30 09:15:00')")  # fmt: skip
    table = _app().dataframe[0].value
    row = table[table["name"] == "quiet"].iloc[0]
    assert row["message"] == ""
    # never claimed (a script, an older file): started reads when it was registered
    assert str(row["claimed_at"]).startswith("2026-11-30 09:15")


def test_app_start_reaps_runs_and_jobs_of_dead_owners(env):
    """Opening the app (any page) reaps once per server start: a CLI run killed by Ctrl-C and a
    job whose worker died read ``interrupted`` before anyone opens Runs & jobs."""
    store = Store(env["db"])
    _add_run(store, "run-ctrlc", "ctrl-c'd CLI run", DEAD_PID)
    _add_run(store, "run-alive", "live CLI run", os.getpid())
    job_id = queue.submit(store, "probe", {"model": "smollm2", "probe_sets": ["general"]})
    store.execute("UPDATE jobs SET status = 'running', pid = ?, host = ?, heartbeat_at = ? "
                  "WHERE job_id = ?", [DEAD_PID, __import__("socket").gethostname(),
                                       dt.datetime.now(), job_id])  # fmt: skip
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=60)
    at.run()  # the Overview: it does not reap by itself, app.py does
    assert not at.exception, at.exception
    runs = dict(store.query("SELECT run_id, status FROM runs").itertuples(index=False))
    assert runs == {"run-ctrlc": "interrupted", "run-alive": "running"}
    assert queue.list_jobs(store).set_index("job_id")["status"][job_id] == "interrupted"
    at.switch_page("pages/runs.py").run()
    assert not at.exception
    table = at.dataframe[0].value  # finished runs, with the reason in their message
    row = table[table["name"] == "ctrl-c'd CLI run"].iloc[0]
    assert row["status"] == "interrupted" and "start the same config again" in row["message"]


def test_cancelled_job_shows_cancelling_until_it_stops(env):
    store = Store(env["db"])
    job_id = queue.submit(store, "pipeline", {"config": "configs/quick.toml"})
    store.execute("UPDATE jobs SET status = 'running', pid = ?, host = ?, heartbeat_at = ? "
                  "WHERE job_id = ?", [os.getpid(), __import__("socket").gethostname(),
                                       dt.datetime.now(), job_id])  # fmt: skip
    at = _app()
    at.button(key=f"cancel-{job_id}").click().run()
    assert not at.exception
    warning = " ".join(w.value for w in at.warning)
    assert "cancelling" in warning and "by force" in warning
    assert not [b for b in at.button if b.key == f"cancel-{job_id}"]  # no second Cancel


def test_base_model_control_is_the_one_submitted_and_is_validated(env):
    model = env["tmp"] / "my-model"
    make_tiny_model("llama", path=model, seed=3)
    at = _app()
    at.text_input(key="run_model").set_value("/no/such/model").run()
    assert "does not exist" in at.error[0].value  # said before Start run
    at.text_input(key="run_model").set_value(str(model)).run()
    assert not at.error
    at.multiselect[0].set_value(["sft"])
    at.button(key="start_run").click().run()
    assert not at.error, [e.value for e in at.error]
    spec = json.loads(queue.list_jobs(Store(env["db"]))["spec_json"][0])
    assert spec["config_dict"]["run"]["model"] == str(model)


def test_estimate_before_start_uses_stored_stage_timings(env):
    store = Store(env["db"])
    at = _app()
    assert any("no stored stage timings for smollm2" in c.value for c in at.caption)
    # two stored runs of smollm2: 60 s per checkpoint evaluation, 0.5 s per example-step
    now = dt.datetime.now()
    for i, steps in enumerate((10, 40)):
        run_id = f"run-{i}"
        config = {"run": {"model": "smollm2"}, "train": {"batch_size": 4}}
        store.execute("INSERT INTO runs (run_id, status, config_json) VALUES (?, 'done', ?)",
                      [run_id, dumps(config)])  # fmt: skip
        store.execute("INSERT INTO stages (run_id, stage_index, stage, steps, seconds, created_at) "
                      "VALUES (?, 0, 'base', 0, 60, ?), (?, 1, 'sft', ?, ?, ?)",
                      [run_id, now, run_id, steps, 60 + 0.5 * 4 * steps, now])  # fmt: skip
    at = _app()
    at.multiselect[0].set_value(["sft", "math"]).run()  # 24 steps × batch 4 by default
    expected = 60 + 2 * (60 + 24 * 4 * 0.5)  # = 276 s
    caption = next(c.value for c in at.caption if "Estimated time" in c.value)
    assert "4 min 36 s" in caption and "500.0 ms per training example-step" in caption, caption
    assert expected == 276
