"""Run model-written Python against unit tests, isolated with bubblewrap.

Used for code pass@1 (Chen et al. 2021, HumanEval: a problem passes when ``check(entry_point)``
raises nothing). Each program runs as ``python -I -`` (source over stdin, nothing written to the
host) inside a `bubblewrap <https://github.com/containers/bubblewrap>`_ sandbox:

- **namespaces**: own PID, network, IPC, UTS (and cgroup where available) namespaces. The network
  namespace has only its own loopback, so the host's 127.0.0.1 and everything else is
  unreachable; ``/proc`` is a fresh mount of the sandbox's PID namespace, so no host process (nor
  its environment) is visible.
- **filesystem**: a new root that holds only ``/usr`` (and the ``/bin``, ``/lib*`` links), the
  Python installation, a minimal ``/dev`` and ``/proc``, all read-only, plus the program folder
  ``/sandbox``: a size-capped tmpfs, the only writable place, gone when the program ends. The
  project's database, data folder, home directories and ``/etc`` are simply not there.
- **identity**: the program runs as uid/gid 65534 (``nobody``) with no supplementary groups, no
  capabilities and ``no_new_privs`` (setuid binaries cannot raise it). Run as root, bwrap sets up
  the sandbox and ``setpriv`` drops to that uid before exec; run as another user, bwrap maps the
  caller to 65534 in a user namespace.
- **rlimits** (``prlimit``): CPU seconds, address space, file size, no core dumps, open files and
  a process/thread cap (``RLIMIT_NPROC``, counted per uid).
- **wall clock**: at the deadline the sandbox's PID-1 is SIGKILLed, which makes the kernel kill
  every process in the namespace (detached or double-forked ones included); bwrap also runs with
  ``--die-with-parent``. When the program exits by itself, its namespace ends with it, so nothing
  it started survives either way. The parent never waits on a pipe past the deadline.
- **output**: stdout goes to /dev/null; stderr is read in chunks and only the last
  :data:`MAX_OUTPUT_CHARS` are kept, so a flood cannot grow the parent's memory.

Needs: Linux, ``bwrap`` (Debian package ``bubblewrap``), ``setpriv`` and ``prlimit``
(util-linux). When the probe in :func:`isolation_status` fails, :func:`require_isolation` raises a
:class:`CollapseError` unless the user opted in with ``COLLAPSE_ALLOW_UNISOLATED=1``; the programs
then run with the rlimits and the timeout only.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import CollapseError

__all__ = [
    "SandboxResult",
    "humaneval_program",
    "isolation_status",
    "require_isolation",
    "run_python",
]

#: Defaults per program: HumanEval tests finish in well under a second.
TIMEOUT_S = 10.0
MEMORY_MB = 1024
MAX_OUTPUT_CHARS = 2000
#: Processes + threads the sandbox uid may have at once (a fork bomb stops here).
MAX_PROCESSES = 16
#: Size of the writable program folder (a tmpfs inside the sandbox).
FOLDER_BYTES = 16 * 1024 * 1024
#: Largest single file a program may write.
MAX_FILE_BYTES = 1024 * 1024
SANDBOX_UID = 65534
SANDBOX_DIR = "/sandbox"
#: Opt-in for machines without working isolation.
ALLOW_UNISOLATED_ENV = "COLLAPSE_ALLOW_UNISOLATED"
#: Where to find bwrap (default: on PATH); set to an empty string to disable isolation.
BWRAP_ENV = "COLLAPSE_BWRAP"
_READ_CHUNK = 65536


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one program: ``status`` is "passed", "failed" or "timeout"."""

    status: str
    returncode: int | None
    stderr_tail: str

    @property
    def passed(self) -> bool:
        """True when the program exited with status 0 within its limits."""
        return self.status == "passed"


def _python_paths() -> list[str]:
    """Folders the interpreter needs that ``/usr`` does not already hold (pyenv, venvs)."""
    paths = {sys.base_prefix, sys.prefix, str(Path(sys.executable).resolve().parent.parent)}
    return sorted(p for p in paths if p and not p.startswith("/usr/") and os.path.isdir(p))


def _bwrap_argv(bwrap: str, as_root: bool) -> list[str]:
    argv = [bwrap, "--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts",
            "--unshare-cgroup-try", "--die-with-parent", "--new-session",
            "--ro-bind", "/usr", "/usr"]  # fmt: skip
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    made = {"/", "/usr"}
    for path in _python_paths():
        parts = Path(path).parts
        # Parents bwrap would create itself come out 0700: unreadable for the sandbox uid.
        for depth in range(2, len(parts)):
            parent = str(Path(*parts[:depth]))
            if parent not in made:
                argv += ["--perms", "0755", "--dir", parent]
                made.add(parent)
        argv += ["--ro-bind", path, path]
    argv += ["--proc", "/proc", "--dev", "/dev",
             "--size", str(FOLDER_BYTES), "--perms", "1777", "--tmpfs", SANDBOX_DIR,
             "--remount-ro", "/", "--chdir", SANDBOX_DIR, "--clearenv",
             "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", SANDBOX_DIR,
             "--setenv", "TMPDIR", SANDBOX_DIR, "--setenv", "LANG", "C.UTF-8"]  # fmt: skip
    if as_root:
        uid = str(SANDBOX_UID)
        drop = ["--", shutil.which("setpriv") or "/usr/bin/setpriv", "--reuid", uid,
                "--regid", uid, "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]  # fmt: skip
    else:
        uid = str(SANDBOX_UID)
        argv += ["--unshare-user", "--uid", uid, "--gid", uid, "--cap-drop", "ALL"]
        drop = ["--"]
    return argv + drop


def _limit_argv(timeout_s: float, memory_mb: int) -> list[str]:
    cpu = max(1, int(timeout_s) + 1)
    mem = memory_mb * 1024 * 1024
    return [shutil.which("prlimit") or "/usr/bin/prlimit", f"--cpu={cpu}", f"--as={mem}",
            f"--fsize={MAX_FILE_BYTES}", "--core=0", "--nofile=64",
            f"--nproc={MAX_PROCESSES}", "--"]  # fmt: skip


def _python_argv() -> list[str]:
    return [str(Path(sys.executable).resolve()), "-I", "-"]


@functools.lru_cache(maxsize=1)
def isolation_status() -> tuple[bool, str]:
    """(True, "bubblewrap") when a probe program ran isolated as uid 65534 without network;
    otherwise (False, why). Probed once per process."""
    if not sys.platform.startswith("linux"):
        return False, "the sandbox needs Linux namespaces"
    bwrap = os.environ.get(BWRAP_ENV)
    bwrap = shutil.which("bwrap") if bwrap is None else (shutil.which(bwrap) if bwrap else None)
    if not bwrap:
        return False, "bubblewrap (bwrap) is not installed"
    for tool in ("prlimit",) + (("setpriv",) if os.geteuid() == 0 else ()):
        if not shutil.which(tool):
            return False, f"{tool} (util-linux) is not installed"
    probe = (
        "import os, socket\n"
        f"assert os.getuid() == {SANDBOX_UID} and os.getpid() <= 3\n"
        "s = socket.socket()\ns.settimeout(1)\n"
        "try:\n    s.connect(('192.0.2.1', 9))\nexcept OSError:\n    pass\n"
        "else:\n    raise SystemExit('network reachable')\n"
    )
    try:
        result = _run(_bwrap_argv(bwrap, os.geteuid() == 0), probe, 20.0, MEMORY_MB, None)
    except OSError as err:
        return False, f"bwrap could not start ({err})"
    if not result.passed:
        tail = result.stderr_tail.strip().splitlines()
        return False, f"bwrap could not create the sandbox ({tail[-1] if tail else result.status})"
    return True, "bubblewrap"


def require_isolation() -> bool:
    """True when programs will run isolated; False when isolation is unavailable but the user
    opted in (``COLLAPSE_ALLOW_UNISOLATED=1``); otherwise raises a one-line :class:`CollapseError`.
    """
    ok, why = isolation_status()
    if ok:
        return True
    if os.environ.get(ALLOW_UNISOLATED_ENV, "").strip().lower() in ("1", "true", "yes"):
        return False
    raise CollapseError(
        f"generation evals run model-written code and need an isolated sandbox, but {why}: "
        f"install bubblewrap (apt-get install bubblewrap), or set {ALLOW_UNISOLATED_ENV}=1 to "
        "run them with rlimits only (not safe for untrusted models)"
    )


def _unisolated_limits(timeout_s: float, memory_mb: int):  # pragma: no cover - runs in the child
    def apply() -> None:
        cpu = max(1, int(timeout_s) + 1)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        mem = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    return apply


def run_python(
    source: str,
    timeout_s: float = TIMEOUT_S,
    memory_mb: int = MEMORY_MB,
    isolated: bool | None = None,
) -> SandboxResult:
    """Execute ``source`` with ``python -I -`` in the sandbox; never raises for the program's faults.

    Exit status 0 → "passed"; any other status (exception, assertion, rlimit kill) → "failed";
    wall time over ``timeout_s`` → "timeout" (everything the program started is killed).
    ``isolated=None`` asks :func:`require_isolation` (raises when isolation is missing and not
    opted out of); ``False`` runs unisolated (rlimits, own session, timeout only).
    """
    if isolated is None:
        isolated = require_isolation()
    if isolated:
        bwrap = os.environ.get(BWRAP_ENV) or shutil.which("bwrap") or "bwrap"
        return _run(_bwrap_argv(bwrap, os.geteuid() == 0), source, timeout_s, memory_mb, None)
    return _run(None, source, timeout_s, memory_mb, _unisolated_limits(timeout_s, memory_mb))


def _run(
    sandbox_argv: list[str] | None, source: str, timeout_s: float, memory_mb: int, preexec
) -> SandboxResult:
    """Start the program, feed stdin, keep a bounded stderr tail, enforce the wall clock."""
    with tempfile.TemporaryDirectory(prefix="collapse-sandbox-") as workdir:
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir}
        info_r = info_w = -1
        if sandbox_argv is not None:
            info_r, info_w = os.pipe()
            argv = [sandbox_argv[0], "--info-fd", str(info_w), *sandbox_argv[1:]]
            argv += _limit_argv(timeout_s, memory_mb) + _python_argv()
        else:
            argv = _python_argv()
        deadline = time.monotonic() + timeout_s
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                cwd=workdir, env=env, start_new_session=True,
                pass_fds=(info_w,) if info_w >= 0 else (),
                preexec_fn=preexec,  # noqa: PLW1509 - rlimits must be set in the child before exec
            )  # fmt: skip
        finally:
            if info_w >= 0:
                os.close(info_w)
        try:
            timed_out, tail, info = _pump(proc, source.encode(), info_r, deadline)
        finally:
            if proc.poll() is None:
                _kill(proc, info)
            for stream in (proc.stdin, proc.stderr):
                if stream is not None and not stream.closed:
                    stream.close()
            if info_r >= 0:
                os.close(info_r)
            proc.wait()
    if timed_out:
        return SandboxResult("timeout", None, "")
    status = "passed" if proc.returncode == 0 else "failed"
    text = tail.decode("utf-8", errors="replace")
    return SandboxResult(status, proc.returncode, text[-MAX_OUTPUT_CHARS:])


def _pump(
    proc: subprocess.Popen, data: bytes, info_r: int, deadline: float
) -> tuple[bool, bytes, bytearray]:
    """Write ``data`` to stdin, drain stderr (keeping a tail) and the info fd, until the program
    exits and stderr closes, or the deadline passes (→ timed_out)."""
    assert proc.stdin is not None and proc.stderr is not None
    keep = 4 * MAX_OUTPUT_CHARS
    tail, info = bytearray(), bytearray()
    sel = selectors.DefaultSelector()
    os.set_blocking(proc.stdin.fileno(), False)
    sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE, "stdin")
    sel.register(proc.stderr.fileno(), selectors.EVENT_READ, "stderr")
    if info_r >= 0:
        sel.register(info_r, selectors.EVENT_READ, "info")
    view = memoryview(data)
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                _kill(proc, info)
                return True, bytes(tail), info
            for key, _ in sel.select(timeout=min(left, 0.5)):
                if key.data == "stdin":
                    try:
                        view = view[os.write(key.fd, view[:_READ_CHUNK]) :]
                    except (BrokenPipeError, BlockingIOError) as err:
                        if isinstance(err, BlockingIOError):
                            continue
                        view = view[:0]
                    if not view:
                        sel.unregister(key.fd)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, _READ_CHUNK)
                if not chunk:
                    sel.unregister(key.fd)
                elif key.data == "stderr":
                    tail += chunk
                    del tail[:-keep]
                elif len(info) < 4096:
                    info += chunk
        left = deadline - time.monotonic()
        try:
            proc.wait(timeout=max(left, 0.01))
        except subprocess.TimeoutExpired:
            _kill(proc, info)
            return True, bytes(tail), info
        return False, bytes(tail), info
    finally:
        sel.close()


def _kill(proc: subprocess.Popen, info: bytearray) -> None:
    """SIGKILL the sandbox's PID-1 (the kernel then kills its whole PID namespace) and bwrap's
    own process group. The PID-1 is bwrap's child, so its pid cannot be reused before bwrap
    reaps it, and bwrap is still alive here (not yet waited for)."""
    try:
        child = int(json.loads(bytes(info).decode() or "{}").get("child-pid", 0))
    except (ValueError, AttributeError):
        child = 0
    if child > 0 and proc.poll() is None:
        try:
            os.kill(child, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The HumanEval check program: prompt + completion + test code + ``check(entry_point)``.

    ``completion`` is either a body that continues the prompt's ``def`` (what base models and
    our code stage produce) or a whole function, which then simply redefines the stub (a
    ``def`` with only a docstring is valid Python), as instruct models tend to answer.
    """
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
