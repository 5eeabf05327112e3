"""Background work: a job queue kept in the DuckDB file, run by worker processes.

Why in the database: jobs must outlive the Streamlit script run and browser refreshes, be visible
to every process, and survive a crash. The web process only ever *submits* and *reads*; workers
(``python -m collapse_core worker``, started on demand by :func:`ensure_worker`) claim queued jobs,
report progress/ETA/log lines, honour cancel requests between units of work, and write results in
one transaction. A worker killed with ``kill -9`` leaves its job ``running`` with a dead pid;
:func:`reap_interrupted` marks it ``interrupted`` (its partial work was never committed).
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CollapseError
from .store import Store, dumps

QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = (
    "queued", "running", "done", "failed", "cancelled", "interrupted",
)  # fmt: skip
ACTIVE = (QUEUED, RUNNING)
LOG_LINES = 40
HEARTBEAT_EVERY_S = 15.0
HEARTBEAT_STALE_S = 120.0

Handler = Callable[[dict, "JobContext", Store], dict]
HANDLERS: dict[str, Handler] = {}


def handler(kind: str) -> Callable[[Handler], Handler]:
    """Register a job kind (``probe``, ``pipeline``, ``embedding``, ...)."""

    def register(fn: Handler) -> Handler:
        HANDLERS[kind] = fn
        return fn

    return register


def _now() -> dt.datetime:
    return dt.datetime.now()


def submit(store: Store, kind: str, spec: dict[str, Any]) -> str:
    """Queue a job and return its id."""
    job_id = uuid.uuid4().hex[:12]
    store.execute(
        "INSERT INTO jobs (job_id, kind, spec_json, status, progress, message, log_tail, "
        "cancel_requested, created_at) VALUES (?, ?, ?, ?, 0, 'queued', '', false, ?)",
        [job_id, kind, dumps(spec), QUEUED, _now()],
    )
    return job_id


def list_jobs(store: Store, limit: int = 50):
    """Most recent jobs first (a DataFrame)."""
    return store.query(
        "SELECT job_id, kind, status, progress, eta_seconds, message, log_tail, error, "
        "spec_json, result_json, created_at, started_at, finished_at, pid "
        "FROM jobs ORDER BY created_at DESC LIMIT ?",
        [limit],
    )


def get_job(store: Store, job_id: str) -> dict[str, Any] | None:
    """One job as a dict, or None."""
    df = store.query("SELECT * FROM jobs WHERE job_id = ?", [job_id])
    return None if df.empty else df.iloc[0].to_dict()


def request_cancel(store: Store, job_id: str) -> None:
    """Cancel a queued job at once; ask a running one to stop at its next unit of work."""
    with store.transaction() as con:
        con.execute(
            "UPDATE jobs SET status = ?, finished_at = ?, message = 'cancelled before start' "
            "WHERE job_id = ? AND status = ?",
            [CANCELLED, _now(), job_id, QUEUED],
        )
        con.execute(
            "UPDATE jobs SET cancel_requested = true WHERE job_id = ? AND status = ?",
            [job_id, RUNNING],
        )


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed child not yet reaped by its parent) is not alive for us.
    try:
        with open(f"/proc/{int(pid)}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def reap_interrupted(store: Store) -> int:
    """Mark running jobs whose worker died (dead pid on this host, or stale heartbeat)."""
    df = store.query("SELECT job_id, pid, host, heartbeat_at FROM jobs WHERE status = ?", [RUNNING])
    host = socket.gethostname()
    dead = []
    for row in df.itertuples():
        stale = row.heartbeat_at is not None and (
            (_now() - row.heartbeat_at).total_seconds() > HEARTBEAT_STALE_S
        )
        if (row.host == host and not _pid_alive(row.pid)) or stale:
            dead.append(row.job_id)
    for job_id in dead:
        store.execute(
            "UPDATE jobs SET status = ?, finished_at = ?, message = 'interrupted: the worker "
            "stopped mid-job; nothing partial was stored — resubmit to resume' "
            "WHERE job_id = ? AND status = ?",
            [INTERRUPTED, _now(), job_id, RUNNING],
        )
    return len(dead)


def claim_next(store: Store) -> dict[str, Any] | None:
    """Atomically take the oldest queued job for this process."""
    with store.transaction() as con:
        row = con.execute(
            "SELECT job_id FROM jobs WHERE status = ? ORDER BY created_at LIMIT 1", [QUEUED]
        ).fetchone()
        if row is None:
            return None
        con.execute(
            "UPDATE jobs SET status = ?, pid = ?, host = ?, started_at = ?, heartbeat_at = ?, "
            "message = 'starting' WHERE job_id = ?",
            [RUNNING, os.getpid(), socket.gethostname(), _now(), _now(), row[0]],
        )
    return get_job(store, row[0])


@dataclass
class JobContext:
    """Given to a handler: report progress, log lines, and ask whether to stop."""

    store: Store
    job_id: str
    min_interval: float = 0.5
    _last: float = 0.0
    _started: float = 0.0
    _log: list[str] | None = None
    _cancel: bool = False

    def __post_init__(self) -> None:
        self._started = time.monotonic()
        self._log = []

    def log(self, line: str) -> None:
        """Append a line to the job's log tail (kept to the last 40 lines)."""
        self._log = (self._log + [line])[-LOG_LINES:]
        self._write(force=True)

    def progress(self, fraction: float, message: str = "") -> None:
        """Report overall progress in [0, 1]; ETA is extrapolated from elapsed time."""
        self._fraction = max(0.0, min(1.0, fraction))
        self._message = message
        self._write(force=False)

    def should_stop(self) -> bool:
        """True once a cancel was requested (checked at most every 0.5 s)."""
        self._write(force=False)
        return self._cancel

    def _write(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._last < self.min_interval:
            return
        self._last = now
        fraction = getattr(self, "_fraction", 0.0)
        elapsed = now - self._started
        eta = elapsed * (1 - fraction) / fraction if fraction > 0.01 else None
        with self.store.transaction() as con:
            con.execute(
                "UPDATE jobs SET progress = ?, message = ?, eta_seconds = ?, heartbeat_at = ?, "
                "log_tail = ? WHERE job_id = ?",
                [fraction, getattr(self, "_message", ""), eta, _now(), "\n".join(self._log),
                 self.job_id],
            )  # fmt: skip
            row = con.execute(
                "SELECT cancel_requested FROM jobs WHERE job_id = ?", [self.job_id]
            ).fetchone()
        self._cancel = bool(row and row[0])


def run_job(store: Store, job: dict[str, Any]) -> str:
    """Run one claimed job to completion; returns its final status."""
    import json

    from . import job_handlers  # noqa: F401  (registers the handlers)

    ctx = JobContext(store, job["job_id"])
    kind = job["kind"]
    # A heartbeat independent of progress reports: long evaluations report nothing for minutes,
    # and a job is only declared interrupted when its worker is dead or its heartbeat is stale.
    stop_beat = threading.Event()

    def beat() -> None:
        while not stop_beat.wait(HEARTBEAT_EVERY_S):
            try:
                store.execute(
                    "UPDATE jobs SET heartbeat_at = ? WHERE job_id = ?", [_now(), job["job_id"]]
                )
            except Exception:  # a busy DB must not kill the job; the next beat retries
                pass

    beater = threading.Thread(target=beat, daemon=True)
    beater.start()
    try:
        if kind not in HANDLERS:
            raise CollapseError(f"unknown job kind {kind!r}")
        result = HANDLERS[kind](json.loads(job["spec_json"]), ctx, store)
        status, error = DONE, None
    except CollapseError as err:
        status = CANCELLED if ctx._cancel else FAILED
        result, error = {}, str(err)
    except Exception as err:  # a bug: keep the traceback in the job, not in the UI
        status, result = FAILED, {}
        error = f"{type(err).__name__}: {err}"
        ctx.log(traceback.format_exc()[-1500:])
    stop_beat.set()
    beater.join(timeout=5)
    message = "done" if status == DONE else error
    store.execute(
        "UPDATE jobs SET status = ?, progress = CASE WHEN ? THEN 1.0 ELSE progress END, "
        "result_json = ?, error = ?, message = ?, finished_at = ?, eta_seconds = 0 "
        "WHERE job_id = ?",
        [status, status == DONE, dumps(result), error, message, _now(), job["job_id"]],
    )
    return status


def run_worker(store: Store, exit_when_idle: float | None = None, poll: float = 1.0) -> None:
    """Take and run jobs until killed (or idle for ``exit_when_idle`` seconds)."""
    pid_file = _worker_pid_file(store)
    pid_file.write_text(str(os.getpid()))
    idle_since = time.monotonic()
    try:
        while True:
            reap_interrupted(store)
            job = claim_next(store)
            if job is None:
                if exit_when_idle is not None and time.monotonic() - idle_since > exit_when_idle:
                    return
                time.sleep(poll)
                continue
            print(f"job {job['job_id']} ({job['kind']}) started", flush=True)
            status = run_job(store, job)
            print(f"job {job['job_id']} {status}", flush=True)
            idle_since = time.monotonic()
    finally:
        try:
            if pid_file.read_text() == str(os.getpid()):
                pid_file.unlink()
        except OSError:
            pass


def _worker_pid_file(store: Store) -> Path:
    return store.path.with_name(store.path.name + ".worker.pid")


def worker_alive(store: Store) -> bool:
    """Whether a worker process for this database is running on this host."""
    try:
        return _pid_alive(int(_worker_pid_file(store).read_text()))
    except (OSError, ValueError):
        return False


def ensure_worker(store: Store, exit_when_idle: float = 120.0) -> bool:
    """Start a detached worker for this database unless one runs; returns True if started."""
    if worker_alive(store):
        return False
    log = store.path.with_name(store.path.name + ".worker.log")
    cmd = [
        sys.executable, "-m", "collapse_core", "worker", "--db", str(store.path),
        "--exit-when-idle", str(exit_when_idle),
    ]  # fmt: skip
    with open(log, "ab") as fh:
        proc = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, cwd=str(Path(__file__).resolve().parent.parent),
        )  # fmt: skip
    _worker_pid_file(store).write_text(str(proc.pid))
    return True
