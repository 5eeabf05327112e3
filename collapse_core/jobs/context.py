"""What a job handler is given: progress, log lines and the cancel flag, written to its row."""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..store import Store
from .queue import now as _now

LOG_LINES = 40


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
