"""Run claims: at most one process executes a given run at a time.

Two processes started on the same config (two terminals, a worker and a CLI run, two Ray
attempts) would otherwise train the same run twice and commit each stage twice. Before executing
a run, a process claims it in the ``run_claims`` table (owner token, pid, host, heartbeat). A
claim is honoured while its owner keeps its heartbeat fresh; it is taken over when the heartbeat
is older than :data:`STALE_AFTER_S` or when its owner process on this host is gone (``kill -9``),
so a crashed run is resumable at once. The ``stages`` unique index (run_id, stage_index) is the
second line of defence: a commit of an already committed stage fails instead of duplicating it.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from .errors import CollapseError
from .processes import pid_alive
from .store import Store

HEARTBEAT_EVERY_S = 5.0
STALE_AFTER_S = 60.0


@dataclass
class RunClaim:
    """A held claim; ``holder`` describes who holds it when this process could not claim it."""

    run_id: str
    owner: str
    held: bool
    holder: str = ""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)


def _is_stale(pid: int, host: str, heartbeat_at: dt.datetime, now: dt.datetime) -> bool:
    if (now - heartbeat_at).total_seconds() > STALE_AFTER_S:
        return True
    return host == socket.gethostname() and pid != os.getpid() and not pid_alive(pid)


def try_claim(store: Store, run_id: str, owner: str | None = None) -> RunClaim:
    """Claim ``run_id`` for this process in one transaction (held=False if someone else holds
    a live claim)."""
    owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    now = dt.datetime.now()
    with store.transaction() as con:
        row = con.execute(
            "SELECT owner, pid, host, heartbeat_at FROM run_claims WHERE run_id = ?", [run_id]
        ).fetchone()
        if row is not None and row[0] != owner and not _is_stale(row[1], row[2], row[3], now):
            return RunClaim(run_id, owner, held=False, holder=f"pid {row[1]} on {row[2]}")
        con.execute("DELETE FROM run_claims WHERE run_id = ?", [run_id])
        con.execute(
            "INSERT INTO run_claims (run_id, owner, pid, host, claimed_at, heartbeat_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            [run_id, owner, os.getpid(), socket.gethostname(), now, now],
        )
    return RunClaim(run_id, owner, held=True)


def _heartbeat(store: Store, claim: RunClaim) -> None:
    while not claim._stop.wait(HEARTBEAT_EVERY_S):
        try:
            store.execute(
                "UPDATE run_claims SET heartbeat_at = ? WHERE run_id = ? AND owner = ?",
                [dt.datetime.now(), claim.run_id, claim.owner],
            )
        except CollapseError:
            continue  # the file stayed locked for a while; the next beat tries again


def release(store: Store, claim: RunClaim) -> None:
    """Drop a held claim (only if this process still owns it)."""
    claim._stop.set()
    if claim.held:
        store.execute(
            "DELETE FROM run_claims WHERE run_id = ? AND owner = ?", [claim.run_id, claim.owner]
        )


@contextmanager
def claimed(store: Store, run_id: str) -> Iterator[RunClaim]:
    """Claim a run for the duration of the block, with a heartbeat thread while it is held."""
    claim = try_claim(store, run_id)
    beat = None
    if claim.held:
        beat = threading.Thread(target=_heartbeat, args=(store, claim), daemon=True)
        beat.start()
    try:
        yield claim
    finally:
        claim._stop.set()
        if beat is not None:
            beat.join(timeout=HEARTBEAT_EVERY_S + 1)
        release(store, claim)
