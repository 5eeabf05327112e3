"""Run model-written Python against unit tests in a separate, resource-limited process.

Used for code pass@1 (Chen et al. 2021, HumanEval: a problem passes when ``check(entry_point)``
raises nothing). Each program runs as ``python -I -`` (isolated mode: no user site, no
``PYTHONPATH``, no current directory on ``sys.path``) in a fresh empty temporary directory, with an
empty environment, its own session (the whole process group is killed on timeout), and POSIX
rlimits: CPU seconds, address space, file size, no core dumps, a cap on open files. The source
travels over stdin, so no file with model output is left behind.

This contains accidents (infinite loops, memory blow-ups, stray file writes in the working
directory), not a determined attacker: there is no network or filesystem namespace. Run the
generation evals inside a container when the model under test is untrusted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

__all__ = ["SandboxResult", "humaneval_program", "run_python"]

#: Defaults per program: HumanEval tests finish in well under a second.
TIMEOUT_S = 10.0
MEMORY_MB = 1024
MAX_OUTPUT_CHARS = 2000


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


def _limits(timeout_s: float, memory_mb: int):  # pragma: no cover - runs in the child
    import resource

    def apply() -> None:
        cpu = max(1, int(timeout_s) + 1)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        address_space = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    return apply


def run_python(
    source: str, timeout_s: float = TIMEOUT_S, memory_mb: int = MEMORY_MB
) -> SandboxResult:
    """Execute ``source`` with ``python -I -`` under the limits above; never raises for its faults.

    Exit status 0 → "passed"; any other status (exception, assertion, rlimit kill) → "failed";
    wall time over ``timeout_s`` → "timeout" (the process group is killed).
    """
    with tempfile.TemporaryDirectory(prefix="collapse-sandbox-") as workdir:
        env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8"}
        preexec = _limits(timeout_s, memory_mb) if os.name == "posix" else None
        proc = subprocess.Popen(
            [sys.executable, "-I", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=workdir,
            env=env,
            start_new_session=True,
            preexec_fn=preexec,  # noqa: PLW1509 - rlimits must be set in the child before exec
            text=True,
        )
        try:
            _, stderr = proc.communicate(source, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.communicate()
            return SandboxResult("timeout", None, "")
    status = "passed" if proc.returncode == 0 else "failed"
    return SandboxResult(status, proc.returncode, (stderr or "")[-MAX_OUTPUT_CHARS:])


def humaneval_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The HumanEval check program: prompt + completion + test code + ``check(entry_point)``.

    ``completion`` is either a body that continues the prompt's ``def`` (what base models and
    our code stage produce) or a whole function, which then simply redefines the stub (a
    ``def`` with only a docstring is valid Python), as instruct models tend to answer.
    """
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"
