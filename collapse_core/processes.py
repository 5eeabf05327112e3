"""Is a process alive? The one check that run claims, run reaping and the job worker share."""

from __future__ import annotations

import os


def pid_alive(pid: object) -> bool:
    """Whether process ``pid`` exists on this host and is not a zombie; False for NULL, NaN or
    garbage pids. ``os.kill(pid, 0)`` probes existence without signalling (POSIX kill(2)); a
    PermissionError means it exists under another user. A zombie (a killed child its parent has
    not reaped yet, state ``Z`` in ``/proc/<pid>/stat``, proc(5)) is not alive for us."""
    try:
        pid = int(pid)  # type: ignore[call-overload]
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
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True
