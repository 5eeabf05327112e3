"""Runs you can trust: cancel acts within a bound, statuses never go stale.

REAL processes on a tiny random model: a pipeline job in a worker is cancelled mid-training and
reaches ``cancelled`` (job AND runs) within :data:`CANCEL_BOUND_S`; a job that ignores its
cancel is stopped by force after the grace period; a CLI run stopped with Ctrl-C is recorded
``interrupted``, one killed with SIGKILL is reaped to ``interrupted`` at the next start-up, and
both are listed with their owner.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from collapse_core import lifecycle
from collapse_core.errors import Cancelled, CollapseError
from collapse_core.jobs import queue, worker
from collapse_core.monitor import watching
from collapse_core.paths import REPO_ROOT
from collapse_core.runconfig import load_config
from collapse_core.store import Store
from tiny_models import make_tiny_model

QUICK = REPO_ROOT / "configs" / "quick.toml"
#: Cancel → ``cancelled`` in the database, measured from the request (the worker checks between
#: training steps; one tiny-model step takes milliseconds, the rest is polling and DB writes).
CANCEL_BOUND_S = 15.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("lifecycle_tiny")
    make_tiny_model("llama", path=path, seed=0)
    return path


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "COLLAPSE_DATA": str(tmp_path / "data"), **extra}


def _wait(predicate, what: str, log: Path | None, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except CollapseError:  # the DB is busy for a moment
            pass
        time.sleep(0.2)
    text = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}; log:\n{text}")


def _long_config(tiny: Path, seeds: list[int]) -> dict:
    """configs/quick.toml on the tiny model with far more steps than the test waits for."""
    raw = load_config(QUICK).raw
    raw["run"] = {**raw["run"], "model": str(tiny), "seeds": seeds, "stages": ["sft", "math"]}
    raw["train"] = {**raw["train"], "steps": 50_000}
    raw["eval"] = {**raw["eval"], "queue_embeddings": False, "generation_n": 0, "n_ood": 0,
                   "plasticity_steps": 0, "n_heldout": 2}  # fmt: skip
    return raw


def _runs(store: Store) -> dict[str, str]:
    df = store.query("SELECT seed, status FROM runs ORDER BY seed")
    return dict(zip(df["seed"], df["status"], strict=True))


# -- in-process: every inner loop honours the watcher ---------------------------------------
def test_eval_generation_and_training_loops_stop_at_the_next_batch():
    from collapse_core import evals
    from collapse_core.stagedata import load_stage
    from collapse_core.train import TrainConfig, train_stage

    model, tok = make_tiny_model("llama", seed=1)
    examples = load_stage("sft", "heldout", 8, seed=0, source="sample")
    calls = {"n": 0}

    def stop_after(k: int):
        calls["n"] = 0

        def stop() -> bool:
            calls["n"] += 1
            return calls["n"] > k

        return stop

    seen: list[tuple] = []
    with watching(should_stop=stop_after(10**9), on_batch=lambda *a: seen.append(a)):
        evals.heldout_loss(model, tok, examples, batch_size=2)
    assert [s[1:] for s in seen] == [(0, 4), (1, 4), (2, 4), (3, 4)]  # progress per batch
    with pytest.raises(Cancelled), watching(should_stop=stop_after(2)):
        evals.heldout_loss(model, tok, examples, batch_size=2)
    assert calls["n"] == 3  # stopped at the third batch, not at the end
    with pytest.raises(Cancelled), watching(should_stop=stop_after(3)):
        evals.generate_responses(model, tok, ["hi"] * 2, max_new_tokens=500, batch_size=2)
    assert calls["n"] <= 6  # the stopping criterion ended generate() within a decoding step
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(Cancelled), watching(should_stop=stop_after(4)):
        train_stage(model, tok, examples, "sft", TrainConfig(steps=1000, batch_size=2),
                    progress=lambda *_: None)  # fmt: skip
    assert not hasattr(model, "peft_config")  # the adapter was removed, weights untouched
    assert all((p == before[n]).all() for n, p in model.named_parameters())
    evals.heldout_loss(model, tok, examples[:2])  # outside a watcher: no checks at all


# -- a worker cancels a pipeline job within the bound -----------------------------------------
def test_cancel_pipeline_job_mid_training_within_bound(tiny, tmp_path):
    db = tmp_path / "jobs.duckdb"
    store = Store(db)
    job_id = queue.submit(store, "pipeline", {"config_dict": _long_config(tiny, [0, 1])})
    log = tmp_path / "worker.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "collapse_core", "worker", "--db", str(db),
             "--exit-when-idle", "1"],
            cwd=REPO_ROOT, env=_env(tmp_path), stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        _wait(lambda: "step" in str(queue.get_job(store, job_id)["message"]),
              "training to start", log, timeout=240)  # fmt: skip
        claim = store.query("SELECT * FROM run_claims")
        assert list(claim["job_id"]) == [job_id] and claim["pid"][0] == proc.pid
        asked = time.monotonic()
        queue.request_cancel(store, job_id)
        _wait(lambda: queue.get_job(store, job_id)["status"] == queue.CANCELLED,
              "the job to be cancelled", log, timeout=60)  # fmt: skip
        took = time.monotonic() - asked
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"cancel → cancelled in {took:.2f} s")
    assert took < CANCEL_BOUND_S, f"cancel took {took:.1f} s"
    assert proc.returncode == 0, log.read_text()[-2000:]  # stopped cooperatively, not by force
    job = queue.get_job(store, job_id)
    assert "cancelled" in job["message"]
    # the running run and the study's run that had not started yet are both cancelled
    assert _runs(store) == {0: "cancelled", 1: "cancelled"}
    stages = store.query("SELECT stage_index FROM stages")["stage_index"].tolist()
    assert stages == [0]  # the base stage was committed; nothing of the cancelled stage


# -- a job that ignores its cancel is stopped by force -------------------------------------
STUCK_WORKER = textwrap.dedent(
    """
    import sys, time
    from collapse_core import lifecycle
    from collapse_core.jobs import handlers, worker
    from collapse_core.runclaims import claimed
    from collapse_core.store import Store

    def stuck(spec, ctx, store):  # owns a run and never looks at the cancel flag
        with claimed(store, spec["run_id"]), lifecycle.recorded_run(store, spec["run_id"], ctx.job_id):
            while True:
                time.sleep(0.1)

    handlers.HANDLERS["stuck"] = stuck
    worker.run_worker(Store(sys.argv[1]), exit_when_idle=60)
    """
)


def test_job_ignoring_cancel_is_stopped_by_force_after_grace(tmp_path):
    db = tmp_path / "stuck.duckdb"
    store = Store(db)
    store.execute("INSERT INTO runs (run_id, study_id, name, status) "
                  "VALUES ('run-stuck', 'study-x', 'stuck', 'pending')")  # fmt: skip
    job_id = queue.submit(store, "stuck", {"run_id": "run-stuck"})
    script = tmp_path / "stuck_worker.py"
    script.write_text(STUCK_WORKER)
    log = tmp_path / "stuck.log"
    grace = 2.0
    with open(log, "wb") as fh:
        proc = subprocess.Popen([sys.executable, str(script), str(db)], cwd=REPO_ROOT,
                                env=_env(tmp_path, COLLAPSE_CANCEL_GRACE_S=str(grace),
                                         PYTHONPATH=str(REPO_ROOT)),
                                stdout=fh, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        _wait(lambda: store.query("SELECT status FROM runs")["status"][0] == "running",
              "the stuck job to claim its run", log)  # fmt: skip
        asked = time.monotonic()
        queue.request_cancel(store, job_id)
        proc.wait(timeout=grace + worker.HEARTBEAT_EVERY_S + 30)
        took = time.monotonic() - asked
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == worker.EXIT_FORCED, log.read_text()[-2000:]
    # a job stuck in one batch never reads its flag: the watch sees it at its next heartbeat
    assert grace <= took < grace + worker.HEARTBEAT_EVERY_S + 10, took
    job = queue.get_job(store, job_id)
    assert job["status"] == queue.CANCELLED and "by force" in job["message"]
    assert store.query("SELECT status FROM runs")["status"][0] == "cancelled"
    assert Store(db, lock_timeout=5).table_hashes()  # the file opens cleanly afterwards


# -- CLI runs: Ctrl-C, SIGKILL, listed with their owner ------------------------------------
def _cli_run(tiny: Path, db: Path, tmp_path: Path, config: Path) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{config.stem}.log"
    fh = open(log, "wb")  # noqa: SIM115 (closed with the process)
    proc = subprocess.Popen(
        [sys.executable, "-m", "collapse_core", "run", str(config), "--db", str(db),
         "--model", str(tiny)],
        cwd=REPO_ROOT, env=_env(tmp_path), stdout=fh, stderr=subprocess.STDOUT,
        preexec_fn=_default_sigint,
    )  # fmt: skip
    return proc, log


def _default_sigint() -> None:
    # A suite started as a background job of a non-interactive shell inherits SIGINT ignored
    # (POSIX), and Python then installs no KeyboardInterrupt handler in the child, so the
    # Ctrl-C this test sends would be dropped. Give the child the terminal default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _long_toml(tiny: Path, tmp_path: Path, name: str) -> Path:
    text = QUICK.read_text().replace("\nsteps = 3\n", "\nsteps = 50000\n")
    text = text.replace('name = "quick"', f'name = "{name}"')
    # light evaluations, so the test reaches training soon
    for key in ("generation_n", "n_ood", "plasticity_steps"):
        text = re.sub(rf"\n{key} = \d+", f"\n{key} = 0", text)
    text = text.replace("n_heldout = 4", "n_heldout = 1")
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    return path


def test_cli_run_ctrl_c_and_kill_9_never_stay_running(tiny, tmp_path):
    db = tmp_path / "cli.duckdb"
    store = Store(db)

    def training(run_name: str):
        def check() -> bool:
            df = store.query(
                "SELECT c.message FROM run_claims c JOIN runs r USING (run_id) WHERE r.name LIKE ?",
                [f"{run_name} ·%"],
            )
            return not df.empty and "step" in str(df["message"][0])

        return check

    for name, sig in (("ctrlc", signal.SIGINT), ("killed", signal.SIGKILL)):
        proc, log = _cli_run(tiny, db, tmp_path, _long_toml(tiny, tmp_path, name))
        try:
            _wait(training(name), f"the CLI run {name} to train", log, timeout=300)
            proc.send_signal(sig)
            code = proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert code == (130 if sig == signal.SIGINT else -signal.SIGKILL), log.read_text()[-2000:]
        if sig == signal.SIGINT:
            assert "the run is marked interrupted and its committed stages are kept" in (
                log.read_text()
            )

    status = dict(zip(*store.query("SELECT name, status FROM runs").T.values, strict=True))
    by_name = {name.split(" ·")[0]: s for name, s in status.items()}
    assert by_name == {"ctrlc": "interrupted", "killed": "running"}  # nobody noticed yet
    assert lifecycle.reap_runs(store) == 1  # what the app, a worker or `run` do at start-up
    assert lifecycle.reap_runs(store) == 0
    listed = lifecycle.run_activity(store).set_index("name")
    assert set(listed["status"]) == {"interrupted"}
    killed = listed.loc[[n for n in listed.index if n.startswith("killed")][0]]
    assert killed["owner"].startswith("CLI pid")  # its claim outlived it: the reaper read it
    assert "interrupted" in killed["message"]


def test_claim_refuses_a_second_live_owner_and_records_outcomes(tmp_path):
    from collapse_core.runclaims import claimed

    store = Store(tmp_path / "claim.duckdb")
    store.execute("INSERT INTO runs (run_id, status) VALUES ('run-a', 'pending')")
    with claimed(store, "run-a") as held, lifecycle.recorded_run(store, "run-a", "job-1"):
        assert held.held
        assert store.query("SELECT status FROM runs")["status"][0] == "running"
        assert store.query("SELECT job_id FROM run_claims")["job_id"][0] == "job-1"
        # another live process (our parent) holds it
        store.execute("UPDATE run_claims SET pid = ?, owner = 'someone else'", [os.getppid()])
        with pytest.raises(CollapseError, match="already running"):
            lifecycle.claim_run(store, "run-a")
        store.execute("UPDATE run_claims SET pid = ?, owner = ?", [os.getpid(), held.owner])
    assert store.query("SELECT status FROM runs")["status"][0] == "done"
    with pytest.raises(Cancelled), lifecycle.recorded_run(store, "run-a"):
        raise Cancelled("stop")
    assert store.query("SELECT status FROM runs")["status"][0] == "cancelled"


# -- progress and cancel during the starting checkpoint's evaluations -----------------------
def test_base_evaluations_report_progress_and_honour_cancel(tiny, tmp_path, monkeypatch):
    from collapse_core.pipeline import run_study
    from collapse_core.runconfig import parse_config

    monkeypatch.setenv("COLLAPSE_DATA", str(tmp_path / "data"))
    raw = load_config(QUICK).raw
    raw["run"] = {**raw["run"], "model": str(tiny), "stages": ["sft"]}
    raw["eval"] = {**raw["eval"], "queue_embeddings": False, "generation_n": 0}
    store = Store(tmp_path / "p.duckdb")
    seen: list[tuple[float, str]] = []
    run_study(parse_config(raw), store, progress=lambda f, m: seen.append((f, m)))
    base = [(f, m) for f, m in seen if "base:" in m]
    assert len({round(f, 4) for f, _ in base}) >= 8, base  # moves during probe and evals
    assert 0 < base[0][0] < base[-1][0] <= 0.5 + 1e-9  # stage 0 is the first half of 2 units
    assert any("held-out" in m for _, m in base) and any("OOD" in m for _, m in base)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions)  # never goes backwards

    # cancel while the starting checkpoint is being evaluated: stops at the next batch
    raw["run"]["name"] = "cancel-in-evals"
    asked = {"now": False}

    def progress(fraction: float, message: str) -> None:
        asked["now"] = asked["now"] or "held-out" in message

    with pytest.raises(Cancelled):
        run_study(parse_config(raw), store, progress=progress, should_stop=lambda: asked["now"])
    status = store.query("SELECT status FROM runs WHERE name LIKE 'cancel-in-evals%'")["status"]
    assert list(status) == ["cancelled"]
    n = store.query("SELECT count(*) AS n FROM stages s JOIN runs r USING (run_id) "
                    "WHERE r.name LIKE 'cancel-in-evals%'")["n"][0]  # fmt: skip
    assert n == 0  # nothing of the half-evaluated stage 0 was committed
