"""The job queue kept in the DuckDB file: submit, list, cancel, look up.

Why in the database: jobs must outlive the Streamlit script run and browser refreshes, be visible
to every process, and survive a crash. The web process only ever *submits* and *reads*; workers
(:mod:`collapse_core.jobs.worker`) claim queued jobs and run them. This module imports only the
store, so anything may submit work without pulling in the code that runs it.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pandas as pd

from ..errors import CollapseError
from ..lifecycle import CANCELLED, DONE, FAILED, FINISHED, INTERRUPTED, QUEUED, RUNNING, now
from ..store import Store, dumps

__all__ = ["CANCELLED", "DONE", "FAILED", "FINISHED", "INTERRUPTED", "QUEUED", "RUNNING", "now"]
ACTIVE = (QUEUED, RUNNING)


def decode_spec(spec_json: Any, strict: bool = False) -> dict[str, Any]:
    """A job's ``spec_json`` as a dict; ``{}`` for NULL, bad JSON, too deeply nested JSON or JSON
    that is not an object (a corrupt row must not break the pages that list jobs). ``strict``
    (the worker about to run it) raises a one-line :class:`CollapseError` instead."""
    spec: Any = None
    if isinstance(spec_json, str):
        try:
            spec = json.loads(spec_json)
        except (ValueError, RecursionError):
            spec = None
    if isinstance(spec, dict):
        return spec
    if strict:
        raise CollapseError("the job's spec is corrupt (not a JSON object); resubmit the job")
    return {}


def submit(store: Store, kind: str, spec: dict[str, Any]) -> str:
    """Queue a job and return its id."""
    job_id = uuid.uuid4().hex[:12]
    store.execute(
        "INSERT INTO jobs (job_id, kind, spec_json, status, progress, message, log_tail, "
        "cancel_requested, created_at) VALUES (?, ?, ?, ?, 0, 'queued', '', false, ?)",
        [job_id, kind, dumps(spec), QUEUED, now()],
    )
    return job_id


def list_jobs(store: Store, limit: int = 50) -> pd.DataFrame:
    """Most recent jobs first."""
    return store.query(
        "SELECT job_id, kind, status, progress, eta_seconds, message, log_tail, error, "
        "spec_json, result_json, created_at, started_at, finished_at, pid, cancel_requested, "
        f"{_cancel_requested_at(store)} FROM jobs ORDER BY created_at DESC LIMIT ?",
        [limit],
    )


def _cancel_requested_at(store: Store) -> str:
    """The column, or NULL for a file opened read-only that predates it."""
    if store.read_only and "cancel_requested_at" not in store.columns("jobs"):
        return "NULL AS cancel_requested_at"
    return "cancel_requested_at"


def get_job(store: Store, job_id: str) -> dict[str, Any] | None:
    """One job as a dict, or None."""
    df = store.query("SELECT * FROM jobs WHERE job_id = ?", [job_id])
    return None if df.empty else df.iloc[0].to_dict()


def request_cancel(store: Store, job_id: str) -> None:
    """Cancel a queued job at once; ask a running one to stop at its next batch (a worker stops
    it by force if it has not stopped :data:`~collapse_core.jobs.worker.CANCEL_GRACE_S` later)."""
    with store.transaction() as con:
        con.execute(
            "UPDATE jobs SET status = ?, finished_at = ?, message = 'cancelled before start' "
            "WHERE job_id = ? AND status = ?",
            [CANCELLED, now(), job_id, QUEUED],
        )
        con.execute(
            "UPDATE jobs SET cancel_requested = true, cancel_requested_at = ? "
            "WHERE job_id = ? AND status = ? AND NOT coalesce(cancel_requested, false)",
            [now(), job_id, RUNNING],
        )


def jobs_table(store: Store, kind: str | None = None, active_only: bool = False) -> pd.DataFrame:
    """Jobs, newest first, with their spec decoded into ``spec`` (dict) and ``model`` columns."""
    where, params = [], []
    if kind:
        where.append("kind = ?")
        params.append(kind)
    if active_only:
        where.append("status IN ('queued', 'running')")
    sql = (
        "SELECT job_id, kind, status, progress, eta_seconds, message, error, spec_json, "
        "created_at, started_at, finished_at FROM jobs"
        + (f" WHERE {' AND '.join(where)}" if where else "")
        + " ORDER BY created_at DESC"
    )
    df = store.query(sql, params)
    specs = [decode_spec(s) for s in df["spec_json"]]
    df["spec"] = specs
    df["model"] = [str(s.get("model", "")) for s in specs]
    return df


def job_for_key(store: Store, kind: str, field: str, value: str) -> dict[str, Any] | None:
    """The newest job of ``kind`` whose spec has ``field == value`` (e.g. an embedding key)."""
    df = jobs_table(store, kind=kind)
    for row in df.itertuples():
        if str(row.spec.get(field)) == value:
            return df.loc[row.Index].to_dict()
    return None
