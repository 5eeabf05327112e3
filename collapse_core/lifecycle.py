"""The one state machine of jobs and runs, who owns a running run, and reaping dead owners.

Both a job (``jobs.status``) and a pipeline run (``runs.status``) move through::

    waiting ──► running ──► done | failed | cancelled | interrupted
       └──────────────────► cancelled            (cancelled before it started)
    failed | cancelled | interrupted ──► running  (resumed; finished stages are kept)

"waiting" is spelled ``queued`` for jobs and ``pending`` for runs (the stored words predate this
module). ``interrupted`` means the owning process died or was stopped (Ctrl-C, SIGTERM, kill -9)
without finishing; nothing partial was stored because every result is one transaction.

A running run has an owner: the claim in ``run_claims`` (:mod:`collapse_core.runclaims`: owner
token, pid, host, heartbeat) plus, written here, its job id, latest progress line and a cancel
flag. A run whose owner is gone is recognised without waiting: its pid is dead on this host, or
(an owner on another host) its heartbeat is older than :data:`HEARTBEAT_STALE_S`; a run left
``running`` with no claim at all has no owner. :func:`reap_runs` (called once when the app's
server starts, whenever the Runs page opens, and when a worker or ``run`` starts) marks such runs
``interrupted``, so a Ctrl-C'd CLI run never stays "running" forever.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pandas as pd

from .errors import Cancelled, CollapseError
from .processes import pid_alive
from .store import Store

QUEUED, PENDING = "queued", "pending"
RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = (
    "running", "done", "failed", "cancelled", "interrupted",
)  # fmt: skip
FINISHED = (DONE, FAILED, CANCELLED, INTERRUPTED)
#: Allowed moves, for jobs and runs alike (waiting = queued / pending).
TRANSITIONS: dict[str, tuple[str, ...]] = {
    QUEUED: (RUNNING, CANCELLED),
    PENDING: (RUNNING, CANCELLED),
    RUNNING: FINISHED,
    FAILED: (RUNNING,),
    CANCELLED: (RUNNING,),
    INTERRUPTED: (RUNNING,),
    DONE: (RUNNING,),  # a rerun of a finished run is a no-op that passes through running
}

HEARTBEAT_EVERY_S = 15.0
HEARTBEAT_STALE_S = 120.0
PROGRESS_EVERY_S = 2.0


def now() -> dt.datetime:
    """Local wall-clock time, as stored in the jobs, runs and run_claims tables."""
    return dt.datetime.now()


def owner_gone(
    host: str | None,
    pid: int | None,
    heartbeat_at: dt.datetime | None,
    trust_live_pid: bool = False,
) -> bool:
    """True when an owner (of a job or a run) is certainly not working any more: its pid is
    dead on this host, or its heartbeat is older than :data:`HEARTBEAT_STALE_S`.
    ``trust_live_pid``: on this host a live pid alone counts as working (owners that do not
    beat, such as a trainer callback tracking its own run)."""
    if host == socket.gethostname():
        if not pid_alive(pid):
            return True
        if trust_live_pid:
            return False
    if heartbeat_at is None or heartbeat_at != heartbeat_at:  # NULL / NaT: never beat
        return host != socket.gethostname()
    return (now() - heartbeat_at).total_seconds() > HEARTBEAT_STALE_S


def reap_runs(store: Store) -> int:
    """Mark ``running`` runs whose owner is gone (or that have no owner record) ``interrupted``;
    returns how many. Idempotent; safe to call from any process at any time; a read-only store
    is only read (returns 0)."""
    if getattr(store, "read_only", False):
        return 0
    df = store.query(
        "SELECT r.run_id, c.host AS owner_host, c.pid AS owner_pid, c.heartbeat_at FROM runs r "
        "LEFT JOIN run_claims c USING (run_id) WHERE r.status = ?",
        [RUNNING],
    )
    dead = [
        row.run_id
        for row in df.itertuples()
        if row.owner_host is None
        or owner_gone(
            row.owner_host, row.owner_pid, as_datetime(row.heartbeat_at), trust_live_pid=True
        )
    ]
    for run_id in dead:
        finish_run(store, run_id, INTERRUPTED,
                   "interrupted: its process stopped mid-stage; finished stages are kept — "
                   "start the same config again to resume")  # fmt: skip
    return len(dead)


def as_datetime(value: object) -> dt.datetime | None:
    """A stored timestamp (pandas Timestamp, datetime, NaT/None) as a datetime or None."""
    try:
        return None if value is None or pd.isna(value) else pd.Timestamp(value).to_pydatetime()
    except (TypeError, ValueError):
        return None


def finish_run(store: Store, run_id: str, status: str, message: str = "") -> bool:
    """Move a ``running`` run to ``status`` (one of :data:`FINISHED`); False if it was not
    running (a finished run is never rewritten)."""
    if status not in FINISHED:
        raise ValueError(f"{status!r} is not a final status")
    with store.transaction() as con:
        row = con.execute("SELECT status FROM runs WHERE run_id = ?", [run_id]).fetchone()
        if row is None or row[0] != RUNNING:
            return False
        con.execute(
            "UPDATE runs SET status = ?, finished_at = ? WHERE run_id = ?",
            [status, now(), run_id],
        )
        con.execute(
            "UPDATE run_claims SET message = ?, heartbeat_at = ? WHERE run_id = ?",
            [message or status, now(), run_id],
        )
    return True


def cancel_waiting_runs(store: Store, run_ids: list[str]) -> int:
    """``pending`` runs among ``run_ids`` → ``cancelled`` (a cancelled study's later runs)."""
    if not run_ids:
        return 0
    marks = ", ".join("?" for _ in run_ids)
    with store.transaction() as con:
        n = con.execute(
            f"SELECT count(*) FROM runs WHERE status = ? AND run_id IN ({marks})",
            [PENDING, *run_ids],
        ).fetchone()[0]
        con.execute(
            f"UPDATE runs SET status = ?, finished_at = ? WHERE status = ? AND run_id IN ({marks})",
            [CANCELLED, now(), PENDING, *run_ids],
        )
    return int(n)


def request_run_cancel(store: Store, run_id: str) -> None:
    """Ask the owner of a running run (a CLI process or a job) to stop at its next batch."""
    store.execute("UPDATE run_claims SET cancel_requested = true WHERE run_id = ?", [run_id])


def cancel_runs_of_process(store: Store, pid: int, message: str) -> int:
    """Every run ``running`` under ``pid`` on this host → ``cancelled`` (used by a worker that
    stops a job by force)."""
    df = store.query(
        "SELECT r.run_id FROM runs r JOIN run_claims c USING (run_id) "
        "WHERE r.status = ? AND c.pid = ? AND c.host = ?",
        [RUNNING, pid, socket.gethostname()],
    )
    return sum(finish_run(store, run_id, CANCELLED, message) for run_id in df["run_id"])


@dataclass
class RunClaim:
    """The owner's handle on a claimed run: progress lines and the run's own cancel flag."""

    store: Store
    run_id: str
    _fraction: float = 0.0
    _message: str = ""
    _written: float = 0.0
    _cancel: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def progress(self, fraction: float, message: str) -> None:
        """Keep the latest progress; written at most every :data:`PROGRESS_EVERY_S` seconds."""
        with self._lock:
            self._fraction, self._message = fraction, message
        if time.monotonic() - self._written >= PROGRESS_EVERY_S:
            self.beat()

    def should_stop(self) -> bool:
        """True once someone asked this run to stop (:func:`request_run_cancel`); the flag is
        read at most every :data:`PROGRESS_EVERY_S` seconds."""
        if time.monotonic() - self._written >= PROGRESS_EVERY_S:
            self.beat()
        return self._cancel

    def beat(self) -> None:
        """Write the latest progress line and read the cancel flag (a busy file is skipped;
        the heartbeat itself is :mod:`collapse_core.runclaims`' thread)."""
        self._written = time.monotonic()
        with self._lock:
            fraction, message = self._fraction, self._message
        try:
            with self.store.transaction() as con:
                con.execute(
                    "UPDATE run_claims SET progress = ?, message = ? WHERE run_id = ?",
                    [fraction, message, self.run_id],
                )
                row = con.execute(
                    "SELECT cancel_requested FROM run_claims WHERE run_id = ?", [self.run_id]
                ).fetchone()
        except CollapseError:
            return
        self._cancel = bool(row and row[0])


def _record_owner(store: Store, run_id: str, job_id: str | None) -> RunClaim:
    """Mark a run whose claim this process holds ``running`` and note its job on the claim."""
    with store.transaction() as con:
        con.execute(
            "UPDATE run_claims SET job_id = ?, progress = 0, message = 'starting', "
            "cancel_requested = false WHERE run_id = ?",
            [job_id, run_id],
        )
        con.execute("UPDATE runs SET status = ?, finished_at = NULL WHERE run_id = ?",
                    [RUNNING, run_id])  # fmt: skip
    return RunClaim(store, run_id)


def claim_run(store: Store, run_id: str, job_id: str | None = None) -> RunClaim:
    """Claim ``run_id`` for this process (:func:`collapse_core.runclaims.try_claim`, no
    heartbeat thread) and mark it ``running``; a one-line :class:`CollapseError` when another
    live process holds it. For owners that keep the claim for their whole life (track).

    The claim's owner token is this process's own (:func:`process_owner`), so the same process
    claiming the run again (the next poll of ``track``/``watch``, the next probe of the trainer
    callback, a second ``track`` of a finished series) re-enters its own claim instead of being
    refused as "already running"."""
    from .runclaims import try_claim

    if store.query("SELECT 1 FROM runs WHERE run_id = ?", [run_id]).empty:
        raise CollapseError(f"no run {run_id} registered")
    held = try_claim(store, run_id, owner=process_owner())
    if not held.held:
        raise CollapseError(f"run {run_id} is already running ({held.holder}); wait for it to "
                            "finish or cancel it on Runs & jobs")  # fmt: skip
    return _record_owner(store, run_id, job_id)


def process_owner() -> str:
    """The owner token of :func:`claim_run` claims: one per process (pid), stable across calls."""

    return f"{socket.gethostname()}:{os.getpid()}:process"


def release_run(store: Store, run_id: str, status: str = DONE, message: str = "") -> None:
    """End a :func:`claim_run` claim: mark the run ``status`` (if still running) and drop this
    process's claim on it, so nobody sees it as owned by a process that has finished with it."""
    finish_run(store, run_id, status, message)
    store.execute(
        "DELETE FROM run_claims WHERE run_id = ? AND owner = ?", [run_id, process_owner()]
    )


def release_runs_after(
    store: Store, run_ids: list[str], err: BaseException | None, message: str = ""
) -> None:
    """:func:`release_run` every run in ``run_ids`` with the status the end of its owner's work
    calls for: no error → ``done``; :class:`Cancelled` → ``cancelled``; KeyboardInterrupt /
    SystemExit (Ctrl-C, SIGTERM) → ``interrupted``; any other error → ``failed``. ``message``
    (default: the error) is the run's last line; the same mapping as :func:`recorded_run`."""
    if err is None:
        status = DONE
    elif isinstance(err, Cancelled):
        status = CANCELLED
    elif isinstance(err, (KeyboardInterrupt, SystemExit)):
        status = INTERRUPTED
        message = message or ("interrupted (Ctrl-C or SIGTERM); finished stages are kept — "
                              "start the same command again to resume")  # fmt: skip
    else:
        status = FAILED
    text = message or (f"{type(err).__name__}: {err}"[:500] if err is not None else status)
    for run_id in run_ids:
        release_run(store, run_id, status, text)


@contextmanager
def released_run(store: Store, run_id: str) -> Iterator[None]:
    """For the owner of a :func:`claim_run` claim: however the block ends, the run is marked
    (:func:`release_runs_after`) and the claim dropped, so no stale claim or ``running`` stays."""
    try:
        yield
    except BaseException as err:
        release_runs_after(store, [run_id], err)
        raise
    release_runs_after(store, [run_id], None)


@contextmanager
def recorded_run(store: Store, run_id: str, job_id: str | None = None) -> Iterator[RunClaim]:
    """For a run whose claim this process holds (:func:`collapse_core.runclaims.claimed`, which
    keeps the heartbeat): mark it running and record how the block ended — :class:`Cancelled` →
    ``cancelled``; KeyboardInterrupt / SystemExit (Ctrl-C, SIGTERM) → ``interrupted``; any
    other exception → ``failed``; a normal exit → ``done``."""
    claim = _record_owner(store, run_id, job_id)
    try:
        yield claim
    except Cancelled as err:
        finish_run(store, run_id, CANCELLED, str(err))
        raise
    except (KeyboardInterrupt, SystemExit):
        finish_run(store, run_id, INTERRUPTED,
                   "interrupted (Ctrl-C or SIGTERM); finished stages are kept — start the same "
                   "config again to resume")  # fmt: skip
        raise
    except BaseException as err:
        finish_run(store, run_id, FAILED, f"{type(err).__name__}: {err}"[:500])
        raise
    else:
        finish_run(store, run_id, DONE, "done")


def run_activity(store: Store, limit: int = 50) -> pd.DataFrame:
    """Recent runs, however they were started (CLI, job, script), newest first: run_id, name,
    study_id, status, stages (committed / planned), owner (``job <id>`` or ``CLI pid <n> on
    <host>``), heartbeat_age_s, progress (the owner's last fraction of this run), message,
    claimed_at, cancel_requested. A read-only file from before run claims lists its runs
    without owners."""
    claims = "run_claims"
    if getattr(store, "read_only", False) and "job_id" not in store.columns("run_claims"):
        claims = (
            "(SELECT NULL::VARCHAR AS run_id, NULL::INTEGER AS pid, NULL::VARCHAR AS "
            "host, NULL::VARCHAR AS job_id, NULL::TIMESTAMP AS claimed_at, "
            "NULL::TIMESTAMP AS heartbeat_at, NULL::DOUBLE AS progress, NULL::VARCHAR AS message, "
            "NULL::BOOLEAN AS cancel_requested WHERE false)"
        )
    df = store.query(
        "SELECT r.run_id, r.name, r.study_id, r.status, r.stage_order, r.created_at, "
        "c.pid AS owner_pid, c.host AS owner_host, c.job_id AS owner_job_id, c.claimed_at, "
        "c.heartbeat_at, c.progress, "
        "c.message, coalesce(c.cancel_requested, false) AS cancel_requested, "
        "(SELECT count(*) FROM stages s WHERE s.run_id = r.run_id) AS n_stages "
        f"FROM runs r LEFT JOIN {claims} c USING (run_id) "
        "ORDER BY coalesce(c.claimed_at, r.created_at) DESC NULLS LAST LIMIT ?",
        [limit],
    )
    planned = [len(str(o).split(",")) + 1 if isinstance(o, str) and o else None
               for o in df["stage_order"]]  # fmt: skip
    df["stages"] = [
        f"{n} / {p}" if p else str(n) for n, p in zip(df["n_stages"], planned, strict=True)
    ]
    df["owner"] = [_owner_label(job, pid, host) for job, pid, host
                   in zip(df["owner_job_id"], df["owner_pid"], df["owner_host"], strict=True)]  # fmt: skip
    stamp = now()
    df["heartbeat_age_s"] = [
        (stamp - t).total_seconds() if (t := as_datetime(v)) is not None else None
        for v in df["heartbeat_at"]
    ]
    return df


def _owner_label(job_id: object, pid: object, host: object) -> str:
    if isinstance(job_id, str) and job_id:
        return f"job {job_id}"
    if pid is None or pd.isna(pid):
        return "no owner recorded"
    return f"CLI pid {int(pid)} on {host}"
