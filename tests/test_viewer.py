"""The viewer is read-only end to end, and corrupt job rows / stale worker pid files break
nothing (issue 13, class 5)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from collapse_core import ui
from collapse_core.errors import CollapseError
from collapse_core.jobs import queue, worker
from collapse_core.paths import REPO_ROOT, env_flag
from collapse_core.store import Store

PAGES = sorted(p.name for p in (REPO_ROOT / "pages").glob("*.py"))
INJECT = "[evil](http://evil.example) **BOLD** <b>tag</b> :red[red]"
MARKDOWN_ELEMENTS = ("markdown", "caption", "error", "info", "warning", "success", "title")


def _fingerprint(path: Path) -> tuple:
    """Bytes, mtime and the folder listing: any write (or a WAL / pid file) changes it."""
    stat = path.stat()
    listing = sorted(p.name for p in path.parent.iterdir())
    return hashlib.sha256(path.read_bytes()).hexdigest(), stat.st_mtime_ns, listing


def _run(target: Path) -> AppTest:
    at = AppTest.from_file(str(target), default_timeout=90)
    at.run()
    return at


@pytest.fixture
def viewer_db(observatory_db, tmp_path, app_env, monkeypatch) -> Path:
    """A 0444 copy of the fixture database, served with COLLAPSE_READONLY=1."""
    folder = tmp_path / "viewer"
    folder.mkdir()
    path = folder / "viewer.duckdb"
    shutil.copy(observatory_db["db"], path)
    path.chmod(0o444)
    app_env["use"](path)
    monkeypatch.setenv("COLLAPSE_READONLY", "1")
    ui._store.clear()
    return path


@pytest.mark.parametrize("page", ["../app.py", *PAGES])
def test_every_page_read_only_on_a_0444_database(viewer_db, app_env, page):
    before = _fingerprint(viewer_db)
    at = _run(REPO_ROOT / "pages" / page)
    assert not at.exception, at.exception
    assert not at.get("file_uploader"), "an upload widget in read-only mode"
    assert _fingerprint(viewer_db) == before, "the viewer wrote the database folder"
    assert app_env["started"] == [], "the viewer started a worker"


@pytest.mark.parametrize("value", ["1", "true", "YES", " Yes "])
def test_readonly_flag_parsed_once_for_every_page(value, monkeypatch):
    monkeypatch.setenv("COLLAPSE_READONLY", value)
    assert env_flag("COLLAPSE_READONLY") is True
    for off in ("", "0", "false", "No"):
        monkeypatch.setenv("COLLAPSE_READONLY", off)
        assert env_flag("COLLAPSE_READONLY") is False


def test_garbage_readonly_value_stops_every_page_with_one_line(viewer_db, monkeypatch):
    monkeypatch.setenv("COLLAPSE_READONLY", "ture")
    before = _fingerprint(viewer_db)
    for page in PAGES:
        at = _run(REPO_ROOT / "pages" / page)
        assert not at.exception, (page, at.exception)
        assert at.error and "READONLY" in at.error[0].value and "ture" in at.error[0].value, page
    assert _fingerprint(viewer_db) == before


def test_mistyped_database_path_is_an_error_not_a_new_database(viewer_db, app_env, tmp_path):
    missing = tmp_path / "typo" / "colapse.duckdb"
    app_env["use"](missing)
    at = _run(REPO_ROOT / "app.py")
    assert not at.exception
    assert at.error and "not found" in at.error[0].value
    assert not missing.exists() and not missing.parent.exists()


def test_read_only_store_refuses_writes_and_workers(observatory_db, tmp_path):
    viewer_db = tmp_path / "ro.duckdb"
    shutil.copy(observatory_db["db"], viewer_db)
    viewer_db.chmod(0o444)
    store = Store(viewer_db, read_only=True)
    assert not store.query("SELECT * FROM studies").empty
    with pytest.raises(CollapseError, match="read-only"):
        queue.submit(store, "probe", {"model": "smollm2"})
    with pytest.raises(CollapseError, match="read-only"):
        worker.ensure_worker(store)
    assert worker.reap_interrupted(store) == 0
    with pytest.raises(CollapseError, match="not a valid DuckDB"):
        garbage = viewer_db.with_name("garbage.duckdb")
        garbage.write_bytes(b"not a database" * 100)
        Store(garbage, read_only=True)


def _corrupt_jobs(store: Store) -> None:
    import socket

    rows = [
        ("j-badjson", "pipeline", "{not json", "running"),
        ("j-list", "probe", "[1, 2, 3]", "queued"),
        ("j-null", "pipeline", None, "running"),
        ("j-types", "pipeline", '{"config_dict": {"run": {"stages": "sft"}}}', "failed"),
        ("j-types2", "probe", '{"probe_sets": "general", "model": null}', "queued"),
        ("j-deep", "probe", "[" * 5000 + "]" * 5000, "queued"),
        ("j-nokind", None, "{}", None),
    ]
    for job_id, kind, spec, status in rows:
        store.execute(
            "INSERT INTO jobs (job_id, kind, spec_json, status, pid, host, message) "
            "VALUES (?, ?, ?, ?, NULL, ?, NULL)",
            [job_id, kind, spec, status, socket.gethostname()],
        )


@pytest.mark.parametrize("page", ["overview.py", "runs.py"])
def test_corrupt_job_rows_do_not_break_the_pages(observatory_db_copy, app_env, page):
    store = Store(observatory_db_copy["db"])
    _corrupt_jobs(store)
    app_env["use"](observatory_db_copy["db"])
    ui._store.clear()
    at = _run(REPO_ROOT / "pages" / page)
    assert not at.exception, at.exception
    table = queue.jobs_table(store)
    assert set(table["job_id"]) >= {"j-badjson", "j-list", "j-null", "j-deep"}
    assert all(isinstance(spec, dict) for spec in table["spec"])


def test_markdown_in_names_is_shown_as_typed(observatory_db_copy, app_env, monkeypatch):
    store = Store(observatory_db_copy["db"])
    store.execute("UPDATE studies SET name = ?", [INJECT])
    store.execute("UPDATE checkpoints SET name = ?", [INJECT])
    store.execute("UPDATE runs SET name = ?", [INJECT])
    queue.submit(store, "probe", {"model": INJECT, "probe_sets": [INJECT]})
    store.execute("UPDATE jobs SET message = ?", [INJECT])
    app_env["use"](observatory_db_copy["db"])
    monkeypatch.setenv("COLLAPSE_READONLY", "1")
    ui._store.clear()
    shown = []
    for page in PAGES:
        at = _run(REPO_ROOT / "pages" / page)
        assert not at.exception, (page, at.exception)
        for kind in MARKDOWN_ELEMENTS:
            for element in getattr(at, kind):
                text = str(element.value)
                assert "[evil](http" not in text and "**BOLD**" not in text, (page, kind, text)
                assert "<b>" not in text and ":red[" not in text, (page, kind, text)
                shown.append(text)
    assert any(ui.md_escape(INJECT) in text for text in shown), "the study name is not shown"


def test_stale_pid_file_does_not_stop_the_jobs(tmp_path):
    """A pid file naming a dead pid, a pid reused by another program, or garbage is no worker:
    ensure_worker starts a real one (which exits when idle)."""
    store = Store(tmp_path / "jobs.duckdb")
    pid_file = worker._worker_pid_file(store)
    dead = subprocess.Popen(["true"])
    dead.wait()
    other = subprocess.Popen(["sleep", "30"])  # alive, but not a collapse_core worker
    try:
        for stale in (str(dead.pid), str(other.pid), "garbage", ""):
            pid_file.write_text(stale)
            assert not worker.worker_alive(store), stale
        pid_file.write_text(str(other.pid))
        assert worker.ensure_worker(store, exit_when_idle=1.0)
        pid = int(pid_file.read_text())
        assert pid != other.pid and worker.worker_alive(store)
        deadline = time.time() + 90
        while worker.worker_alive(store) and time.time() < deadline:
            time.sleep(0.5)
        assert not worker.worker_alive(store), "the started worker did not exit when idle"
    finally:
        other.kill()
        other.wait()


def test_worker_survives_a_corrupt_job_row(tmp_path):
    store = Store(tmp_path / "jobs.duckdb")
    _corrupt_jobs(store)
    out = subprocess.run(
        [sys.executable, "-m", "collapse_core", "worker", "--db", str(store.path),
         "--exit-when-idle", "0.5"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=120,
        env={**os.environ, "COLLAPSE_DATA": str(tmp_path / "data")},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    statuses = dict(store.query("SELECT job_id, status FROM jobs").itertuples(index=False))
    assert statuses["j-list"] == "failed" and statuses["j-deep"] == "failed"
    assert statuses["j-badjson"] == "interrupted"  # running with a dead (NULL) pid: reaped
