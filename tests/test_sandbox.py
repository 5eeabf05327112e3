"""Sandboxed execution of generated code and the HumanEval pass@1 path."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import tracemalloc

import pytest

from collapse_core import sandbox
from collapse_core.errors import CollapseError
from collapse_core.evals import code_pass_at_1, extract_code
from collapse_core.paths import REPO_ROOT
from collapse_core.sandbox import humaneval_program, run_python
from collapse_core.stagedata import load_stage
from tiny_models import make_tiny_model


def humaneval_items():
    items = load_stage("code", "heldout", 50, seed=0, source="sample")
    items = [e for e in items if e.meta.get("entry_point")]
    assert len(items) >= 3
    return items


def test_exit_status_decides_pass_or_fail():
    assert run_python("x = 1 + 1\nassert x == 2\n").passed
    failed = run_python("assert 1 == 2, 'nope'\n")
    assert failed.status == "failed" and "AssertionError: nope" in failed.stderr_tail


def test_infinite_loop_times_out_and_is_killed():
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and not result.passed


def test_memory_blowup_fails_under_the_address_space_limit():
    result = run_python("x = bytearray(3 * 1024 ** 3)\n", memory_mb=512)
    assert result.status == "failed" and "MemoryError" in result.stderr_tail


def test_child_sees_an_empty_environment_and_a_throwaway_working_directory(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "do-not-leak")
    probe = (
        "import os, sys\n"
        "assert 'SECRET_TOKEN' not in os.environ, 'env leaked'\n"
        "assert sys.flags.isolated == 1\n"
        "open('left_behind.txt', 'w').write('x')\n"
        "print(os.path.abspath('left_behind.txt'), file=sys.stderr)\n"
    )
    result = run_python(probe)
    assert result.passed, result.stderr_tail
    assert not os.path.exists(result.stderr_tail.strip())  # nothing is left on the host


def test_canonical_humaneval_solutions_pass_and_wrong_ones_fail():
    for ex in humaneval_items():
        good = humaneval_program(ex.prompt, ex.response, ex.meta["test"], ex.meta["entry_point"])
        assert run_python(good).passed, ex.meta["task_id"]
        bad = humaneval_program(ex.prompt, "    return None\n", ex.meta["test"],
                                ex.meta["entry_point"])  # fmt: skip
        assert not run_python(bad).passed, ex.meta["task_id"]


def test_a_whole_function_in_a_fenced_block_replaces_the_stub():
    ex = humaneval_items()[0]
    body = ex.response
    response = (
        "Here is the solution:\n```python\n"
        + ex.prompt.split("def ", 1)[0]  # the prompt's imports
        + "def "
        + ex.prompt.split("def ", 1)[1]
        + body
        + "```\nIt works because..."
    )
    code = extract_code(response, ex.meta["entry_point"])
    assert code.startswith(ex.prompt.split("def ", 1)[0]) and "It works" not in code
    program = humaneval_program(ex.prompt, code, ex.meta["test"], ex.meta["entry_point"])
    assert run_python(program).passed


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pass_at_1_generates_runs_and_scores_every_problem(arch):
    model, tok = make_tiny_model(arch)
    items = humaneval_items()
    result = code_pass_at_1(model, tok, items + [items[0].__class__("no tests", "x")],
                            max_new_tokens=8, batch_size=2)  # fmt: skip
    assert result["n"] == len(items)  # the item without HumanEval metadata is skipped
    assert [r["task_id"] for r in result["results"]] == [e.meta["task_id"] for e in items]
    # A random tiny model writes gibberish: every program must fail, none may pass by accident.
    assert result["pass_at_1"] == 0.0
    assert all(r["status"] == "failed" for r in result["results"])


def test_extract_code_finds_the_function_wherever_the_model_put_it():
    fenced = "Here:\n```python\ndef f(x):\n    return x\n```\nand ```py\ndef g(): pass\n```"
    assert extract_code(fenced, "g") == "def g(): pass\n"
    assert extract_code(fenced, "f") == "def f(x):\n    return x\n"
    assert extract_code(fenced, "h") == "def f(x):\n    return x\n"  # first block
    assert extract_code("```python\ndef h(): return 1", "h") == "def h(): return 1"  # unclosed
    # SmolLM2 style: code first, then only a closing fence and an explanation.
    closing_only = "def h(x):\n    return 2 * x\n```\n\nThis doubles x."
    assert extract_code(closing_only, "h") == "def h(x):\n    return 2 * x\n"
    assert extract_code("    return 1\n", "h") == "    return 1\n"  # a bare body


# -- attacks a model-written program might try (each one succeeded against the rlimit-only
# sandbox this replaced) ---------------------------------------------------------------------


def _must_fail_to(action: str, paths: list[str]) -> str:
    """A program that exits 0 only when every ``action(path)`` raises OSError."""
    return (
        "import os, sys\n"
        f"for path in {paths!r}:\n"
        "    try:\n"
        f"        {action}\n"
        "    except OSError:\n"
        "        continue\n"
        "    sys.exit(f'escaped: {path}')\n"
    )


def test_root_only_files_are_unreadable(tmp_path):
    secret = tmp_path / "root_only.txt"
    secret.write_text("secret")
    secret.chmod(0o600)
    result = run_python(_must_fail_to("open(path).read()", ["/etc/shadow", str(secret)]))
    assert result.passed, result.stderr_tail


def test_project_database_and_data_folder_are_not_visible(tmp_path):
    db = tmp_path / "collapse.duckdb"
    db.write_bytes(b"DUCK" * 100)
    db.chmod(0o644)
    tmp_path.chmod(0o755)
    targets = [str(db), str(REPO_ROOT / "collapse_core" / "store.py")]
    result = run_python(_must_fail_to("open(path, 'rb').read()", targets))
    assert result.passed, result.stderr_tail
    listing = run_python(_must_fail_to("os.listdir(path)", [str(tmp_path), str(REPO_ROOT)]))
    assert listing.passed, listing.stderr_tail


def test_other_processes_environment_is_not_readable_through_proc():
    holder = subprocess.Popen(["sleep", "30"], env={"WORKER_SECRET": "hunter2-token"})
    try:
        program = (
            "import os, sys\n"
            "for pid in [p for p in os.listdir('/proc') if p.isdigit()]:\n"
            "    try:\n"
            "        data = open(f'/proc/{pid}/environ', 'rb').read()\n"
            "    except OSError:\n"
            "        continue\n"
            "    if b'hunter2-token' in data:\n"
            "        sys.exit(f'read the environment of pid {pid}')\n"
        )
        result = run_python(program)
        assert result.passed, result.stderr_tail
    finally:
        holder.kill()
        holder.wait()


def test_own_pid_namespace_and_an_unprivileged_uid():
    program = (
        "import os\n"
        "assert os.getuid() == os.geteuid() == 65534, os.getuid()\n"
        "assert os.getgid() == 65534 and os.getgroups() in ([], [65534]), os.getgroups()\n"
        "status = open('/proc/self/status').read()\n"
        "assert 'CapEff:\\t0000000000000000' in status, 'has capabilities'\n"
        "assert 'NoNewPrivs:\\t1' in status\n"
        "pids = [p for p in os.listdir('/proc') if p.isdigit()]\n"
        "assert len(pids) <= 3, f'sees {len(pids)} processes'\n"
    )
    result = run_python(program)
    assert result.passed, result.stderr_tail


def test_cannot_write_outside_its_folder(tmp_path):
    tmp_path.chmod(0o777)
    outside = [str(tmp_path / "escape.txt"), "/tmp/collapse-escape.txt", "/usr/escape.txt",
               "/escape.txt"]  # fmt: skip
    program = _must_fail_to("open(path, 'w').write('x')", outside)
    program += "open('inside.txt', 'w').write('fine')\n"  # its own folder stays writable
    result = run_python(program)
    assert result.passed, result.stderr_tail
    assert not (tmp_path / "escape.txt").exists()


def test_host_loopback_is_unreachable():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        program = (
            "import socket, sys\n"
            "s = socket.socket()\n"
            "s.settimeout(2)\n"
            "try:\n"
            f"    s.connect(('127.0.0.1', {port}))\n"
            "except OSError:\n"
            "    sys.exit(0)\n"
            "sys.exit('reached the host loopback')\n"
        )
        result = run_python(program)
        assert result.passed, result.stderr_tail
    finally:
        server.close()


def test_fork_is_bounded():
    program = (
        "import os, sys, time\n"
        "n = 0\n"
        "try:\n"
        "    for _ in range(200):\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(3)\n"
        "            os._exit(0)\n"
        "        n += 1\n"
        "except OSError:\n"
        "    pass\n"
        "print(n, file=sys.stderr)\n"
    )
    result = run_python(program, timeout_s=20)
    assert result.passed, result.stderr_tail
    assert int(result.stderr_tail.split()[-1]) < sandbox.MAX_PROCESSES


def _processes_with(marker: str) -> list[int]:
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            if marker.encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                found.append(int(pid))
        except OSError:
            continue
    return found


def _run_with_a_daemon(seconds: str, hold_stderr: bool, rest: str, timeout_s: float):
    """Run a program that starts ``sleep seconds`` in its own session, then ``rest``; return
    (result, elapsed s, pids of that sleep still alive on the host after a 3 s grace)."""
    streams = "" if hold_stderr else ", stdin=-3, stdout=-3, stderr=-3"  # -3: DEVNULL
    program = (
        "import subprocess\n"
        f"subprocess.Popen(['sleep', '{seconds}'], start_new_session=True{streams})\n{rest}"
    )
    try:
        start = time.monotonic()
        result = run_python(program, timeout_s=timeout_s)
        elapsed = time.monotonic() - start
        deadline = time.monotonic() + 3
        while _processes_with(seconds) and time.monotonic() < deadline:
            time.sleep(0.05)
        return result, elapsed, _processes_with(seconds)
    finally:
        for pid in _processes_with(seconds):
            os.kill(pid, 9)


def test_no_detached_child_survives_the_program():
    result, _, alive = _run_with_a_daemon("47.1234", False, "print('started')\n", 10)
    assert result.passed and not alive, "a detached child outlived the sandbox"


def test_a_grandchild_holding_stderr_cannot_overrun_the_timeout():
    result, elapsed, alive = _run_with_a_daemon("23.4567", True, "while True:\n    pass\n", 2)
    assert result.status == "timeout"
    assert elapsed < 6, f"returned after {elapsed:.1f} s with a 2 s timeout"
    assert not alive, "the grandchild survived the timeout kill"


def test_a_stderr_flood_keeps_parent_memory_bounded():
    flood = "import sys\nchunk = 'x' * 65536\nfor _ in range(1024):\n    sys.stderr.write(chunk)\n"
    tracemalloc.start()
    try:
        result = run_python(flood, timeout_s=30)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.passed
    assert len(result.stderr_tail) <= sandbox.MAX_OUTPUT_CHARS
    assert peak < 8 * 1024 * 1024, f"parent peaked at {peak / 2**20:.0f} MiB for 64 MiB of stderr"


@pytest.fixture
def no_isolation(monkeypatch):
    monkeypatch.setenv(sandbox.BWRAP_ENV, "")
    monkeypatch.delenv(sandbox.ALLOW_UNISOLATED_ENV, raising=False)
    sandbox.isolation_status.cache_clear()
    yield monkeypatch
    sandbox.isolation_status.cache_clear()


def test_generation_evals_refuse_to_run_without_isolation_unless_opted_in(no_isolation):
    model, tok = make_tiny_model("llama")
    items = humaneval_items()[:2]
    with pytest.raises(CollapseError, match="bubblewrap") as err:
        code_pass_at_1(model, tok, items, max_new_tokens=4)
    assert "\n" not in str(err.value)
    no_isolation.setenv(sandbox.ALLOW_UNISOLATED_ENV, "1")
    result = code_pass_at_1(model, tok, items, max_new_tokens=4)
    assert result["n"] == 2 and result["pass_at_1"] == 0.0
