"""Worker processes: claim queued jobs, run their handler, record the outcome.

Workers (``python -m collapse_core worker``, started on demand by :func:`ensure_worker`) claim
queued jobs, report progress/ETA/log lines through a :class:`JobContext`, honour cancel requests
between batches (and stop a job by force :func:`cancel_grace_s` seconds after an ignored
cancel, :func:`stop_by_force`), and write results in one transaction. A worker killed with
``kill -9`` leaves its job ``running`` with a dead pid; :func:`reap_interrupted` marks it
``interrupted`` (its partial work was never committed). SIGTERM marks it ``interrupted`` at once.
"""

from __future__ import annotations

import functools
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from .. import lifecycle
from ..errors import CollapseError
from ..monitor import watching
from ..processes import pid_alive as _pid_alive
from ..store import Store, dumps, writes_held
from .context import JobContext
from .handlers import HANDLERS
from .queue import CANCELLED, DONE, FAILED, INTERRUPTED, QUEUED, RUNNING, decode_spec, get_job
from .queue import now as _now

HEARTBEAT_EVERY_S = lifecycle.HEARTBEAT_EVERY_S
HEARTBEAT_STALE_S = lifecycle.HEARTBEAT_STALE_S
#: How long a running job may ignore a cancel request before its worker stops it by force
#: (``$COLLAPSE_CANCEL_GRACE_S`` overrides). Work checks the flag between batches, so a job
#: normally stops within one batch; this bounds a batch that hangs.
CANCEL_GRACE_S = 30.0
CANCEL_POLL_S = 1.0
EXIT_FORCED = 75


def cancel_grace_s() -> float:
    """:data:`CANCEL_GRACE_S`, or ``$COLLAPSE_CANCEL_GRACE_S`` when set to a number."""
    try:
        return float(os.environ.get("COLLAPSE_CANCEL_GRACE_S", CANCEL_GRACE_S))
    except ValueError:
        return CANCEL_GRACE_S


def reap_interrupted(store: Store) -> int:
    """Mark running jobs whose worker died (dead pid on this host, or stale heartbeat)
    ``interrupted``, and the same for runs (:func:`collapse_core.lifecycle.reap_runs`);
    returns the number of jobs reaped. A read-only store is only read (returns 0)."""
    if getattr(store, "read_only", False):
        return 0
    df = store.query("SELECT job_id, pid, host, heartbeat_at FROM jobs WHERE status = ?", [RUNNING])
    dead = [row.job_id for row in df.itertuples()
            if lifecycle.owner_gone(row.host, row.pid, lifecycle.as_datetime(row.heartbeat_at))]  # fmt: skip
    for job_id in dead:
        store.execute(
            "UPDATE jobs SET status = ?, finished_at = ?, message = 'interrupted: the worker "
            "stopped mid-job; nothing partial was stored — resubmit to resume' "
            "WHERE job_id = ? AND status = ?",
            [INTERRUPTED, _now(), job_id, RUNNING],
        )
    lifecycle.reap_runs(store)
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


def stop_by_force(store: Store, job_id: str, waited_s: float) -> None:
    """End this worker process at once because job ``job_id`` ignored its cancel request.

    The job and the runs this process owns are marked ``cancelled`` first; the exit happens
    while no transaction of this process is open (:func:`~collapse_core.store.writes_held`), so
    the stage in progress is never half-committed (it was not committed at all). A fresh
    worker is started when other jobs are queued."""
    message = (f"cancelled: stopped by force {waited_s:.0f} s after the request (the job did "
               "not reach a batch boundary); finished stages are kept")  # fmt: skip
    with writes_held():
        store.execute(
            "UPDATE jobs SET status = ?, finished_at = ?, message = ?, error = ?, "
            "eta_seconds = 0 WHERE job_id = ? AND status = ?",
            [CANCELLED, _now(), message, message, job_id, RUNNING],
        )
        lifecycle.cancel_runs_of_process(store, os.getpid(), message)
        queued = store.query("SELECT count(*) AS n FROM jobs WHERE status = ?", [QUEUED])
        pid_file = _worker_pid_file(store)
        try:
            if pid_file.read_text() == str(os.getpid()):
                pid_file.unlink()
        except OSError:
            pass
        if int(queued["n"][0]):
            ensure_worker(store)
        print(f"job {job_id} {message}", flush=True)
        os._exit(EXIT_FORCED)


class _JobWatch(threading.Thread):
    """A heartbeat independent of progress reports (long evaluations can be silent for a while)
    and the cancel deadline. Every :data:`CANCEL_POLL_S` seconds it looks at the cancel flag the
    job's own checks last read (``ctx``, no database access); every :data:`HEARTBEAT_EVERY_S`
    seconds it writes the heartbeat and reads the flag itself (a job stuck in one batch never
    reads it). ``on_overdue(job_id, waited_s)`` is called once the job has ignored a seen
    cancel for ``grace_s``."""

    def __init__(self, store: Store, ctx: JobContext, grace_s: float, on_overdue: Any) -> None:
        super().__init__(daemon=True, name=f"watch-{ctx.job_id}")
        self.store, self.ctx, self.grace_s, self.on_overdue = store, ctx, grace_s, on_overdue
        self.done = threading.Event()

    def _beat(self) -> bool:
        with self.store.transaction() as con:
            con.execute("UPDATE jobs SET heartbeat_at = ? WHERE job_id = ?",
                        [_now(), self.ctx.job_id])  # fmt: skip
            row = con.execute(
                "SELECT cancel_requested FROM jobs WHERE job_id = ?", [self.ctx.job_id]
            ).fetchone()
        return bool(row and row[0])

    def run(self) -> None:
        last_beat, asked_at, fired = time.monotonic(), None, False
        while not self.done.wait(CANCEL_POLL_S):
            asked = self.ctx._cancel
            if time.monotonic() - last_beat >= HEARTBEAT_EVERY_S:
                last_beat = time.monotonic()
                try:
                    asked = self._beat() or asked
                except Exception:  # a busy DB must not kill the job; the next beat retries
                    pass
            if asked and asked_at is None:
                asked_at = time.monotonic()
            waited = time.monotonic() - asked_at if asked_at is not None else 0.0
            if asked_at is not None and not fired and waited >= self.grace_s:
                fired = True
                if self.on_overdue is not None and not self.done.is_set():
                    self.on_overdue(self.ctx.job_id, waited)


def run_job(
    store: Store, job: dict[str, Any], on_overdue: Any = None, grace_s: float | None = None
) -> str:
    """Run one claimed job to completion; returns its final status.

    Library loops check the cancel flag between batches (:mod:`collapse_core.monitor`);
    ``on_overdue(job_id, waited_s)`` is called when a cancel is still ignored after ``grace_s``
    (default :func:`cancel_grace_s`) — the worker passes :func:`stop_by_force`."""
    ctx = JobContext(store, job["job_id"])
    kind = job["kind"]
    watch = _JobWatch(store, ctx, cancel_grace_s() if grace_s is None else grace_s,
                      on_overdue)  # fmt: skip
    watch.start()
    try:
        if kind not in HANDLERS:
            raise CollapseError(f"unknown job kind {kind!r}")
        with watching(should_stop=ctx.should_stop):
            result = HANDLERS[kind](decode_spec(job["spec_json"], strict=True), ctx, store)
        status, error = DONE, None
    except CollapseError as err:
        status = CANCELLED if ctx._cancel else FAILED
        result, error = {}, str(err)
    except Exception as err:  # a bug: keep the traceback in the job, not in the UI
        status, result = FAILED, {}
        error = f"{type(err).__name__}: {err}"
        ctx.log(traceback.format_exc()[-1500:])
    except BaseException:  # Ctrl-C / SIGTERM of the worker: say so before going down
        watch.done.set()
        store.execute(
            "UPDATE jobs SET status = ?, finished_at = ?, message = 'interrupted: the worker "
            "was stopped (SIGTERM / Ctrl-C); nothing partial was stored' "
            "WHERE job_id = ? AND status = ?",
            [INTERRUPTED, _now(), job["job_id"], RUNNING],
        )
        raise
    watch.done.set()
    watch.join(timeout=5)
    message = "done" if status == DONE else error
    store.execute(
        "UPDATE jobs SET status = ?, progress = CASE WHEN ? THEN 1.0 ELSE progress END, "
        "result_json = ?, error = ?, message = ?, finished_at = ?, eta_seconds = 0 "
        "WHERE job_id = ? AND status = ?",
        [status, status == DONE, dumps(result), error, message, _now(), job["job_id"], RUNNING],
    )
    return status


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_worker(store: Store, exit_when_idle: float | None = None, poll: float = 1.0) -> None:
    """Take and run jobs until killed (or idle for ``exit_when_idle`` seconds)."""
    pid_file = _worker_pid_file(store)
    _write_pid_file(pid_file, os.getpid())
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_system_exit)  # runs and jobs record "interrupted"
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
            status = run_job(store, job, on_overdue=functools.partial(stop_by_force, store))
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
