"""Worker processes: claim queued jobs, run their handler, record the outcome.

Workers (``python -m collapse_core worker``, started on demand by :func:`ensure_worker`) claim
queued jobs, report progress/ETA/log lines through a :class:`JobContext`, honour cancel requests
between units of work, and write results in one transaction. A worker killed with ``kill -9`` leaves its job ``running`` with a dead pid;
:func:`reap_interrupted` marks it ``interrupted`` (its partial work was never committed).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from ..errors import CollapseError
from ..store import Store, dumps
from .context import JobContext
from .handlers import HANDLERS
from .queue import CANCELLED, DONE, FAILED, INTERRUPTED, QUEUED, RUNNING, decode_spec, get_job
from .queue import now as _now

HEARTBEAT_EVERY_S = 15.0
HEARTBEAT_STALE_S = 120.0


def _pid_alive(pid: Any) -> bool:
    """Whether ``pid`` is a live (non-zombie) process; False for NULL/NaN/garbage pids."""
    try:
        pid = int(pid)
    except (TypeError, ValueError, OverflowError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
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
    """Mark running jobs whose worker died (dead pid on this host, or stale heartbeat); a
    read-only store is only read (returns 0)."""
    if getattr(store, "read_only", False):
        return 0
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


def run_job(store: Store, job: dict[str, Any]) -> str:
    """Run one claimed job to completion; returns its final status."""

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
        result = HANDLERS[kind](decode_spec(job["spec_json"], strict=True), ctx, store)
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
    _write_pid_file(pid_file, os.getpid())
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


def _write_pid_file(path: Path, pid: int) -> None:
    """Write the pid atomically (a reader never sees half a number)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(str(pid))
    os.replace(tmp, path)


def _is_worker_process(pid: int) -> bool:
    """Whether ``pid`` runs ``collapse_core worker`` (its /proc cmdline), so that a pid file left
    by a dead worker whose pid the system gave to another program is not taken for a worker.
    Where /proc is unreadable only liveness can be checked."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return _pid_alive(pid)
    return b"collapse_core" in argv and b"worker" in argv


def worker_alive(store: Store) -> bool:
    """Whether a worker process for this database is running on this host: the pid file names a
    live process that is a ``collapse_core worker`` (a stale file — dead or reused pid, garbage —
    counts as no worker)."""
    try:
        pid = int(_worker_pid_file(store).read_text().strip())
    except (OSError, ValueError):
        return False
    return _pid_alive(pid) and _is_worker_process(pid)


def ensure_worker(store: Store, exit_when_idle: float = 120.0) -> bool:
    """Start a detached worker for this database unless one runs; returns True if started.
    Never from a read-only store (the viewer starts nothing)."""
    if getattr(store, "read_only", False):
        raise CollapseError("read-only viewer: no worker is started")
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
            start_new_session=True, cwd=str(Path(__file__).resolve().parents[2]),
        )  # fmt: skip
    _write_pid_file(_worker_pid_file(store), proc.pid)
    return True
