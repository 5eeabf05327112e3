"""The Ray executor: each (order, seed, arm) run of a study is one Ray task.

Ray schedules, places and retries; this module only says what a task is. A task asks for
1 GPU when the cluster has GPUs (else 1 CPU), runs :func:`pipeline.execute_run` exactly as the
local executor does (same plan, same seeds) against a private scratch DuckDB, and after every
committed stage writes that stage as an immutable segment under the results folder
(:mod:`collapse_core.segments`). Workers never open the main DB; the driver ingests the segments
in plan order as runs finish. A worker that dies mid-run (node lost, OOM kill, ``kill -9``) is
retried by Ray (``max_retries``); the new attempt rebuilds its scratch DB from the run's
segments and resumes after the last committed stage, from the merged weights kept under
``<results>/runs/<run_id>`` (shared storage on a real cluster).

``ray`` is optional: importing this module works without it; running raises a one-line
:class:`CollapseError` naming the pinned version to install.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import lifecycle
from .errors import CollapseError
from .paths import REPO_ROOT
from .paths import results_dir as default_results_dir
from .pipeline import (
    LogFn,
    ProgressFn,
    RunPlan,
    _queue_trajectory_map,
    _register,
    _silent,
    check_before_writing,
    execute_run,
    finished_stages,
    plan_runs,
)
from .runconfig import RunConfig
from .segments import (
    find_segments,
    ingest_folder,
    ingest_segment,
    progress_table,
    run_folder,
    write_json_atomic,
    write_stage_segment,
)
from .store import Store

RAY_PIN = "ray==2.60.0"
DEFAULT_MAX_RETRIES = 3
# Test hook: "K" or "K:PLAN_INDEX" makes a worker os._exit() right after committing stage K, on
# the first attempt of that run only (the marker file records that it fired), to prove that a
# killed worker is retried and resumes.
FAULT_ENV = "COLLAPSE_FAULT_RAY_EXIT_AFTER_STAGE"
_STATUS_EVERY_S = 2.0


def import_ray() -> Any:
    """``import ray`` or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError as err:
        raise CollapseError(
            f"the Ray executor needs ray: pip install '{RAY_PIN}' (see README, 'Ray cluster')"
        ) from err
    return ray


def start_local_cluster(num_cpus: int | None = None) -> None:
    """Start a private single-node Ray cluster (no dashboard, token authentication on, which
    is Ray 2.60's default), with this checkout on the workers' import path. (Ray resolves a
    127.0.0.1 node address to the machine's address, so it cannot be pinned to loopback.)"""
    ray = import_ray()
    path = os.environ.get("PYTHONPATH", "")
    if str(REPO_ROOT) not in path.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), path) if p)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


class _Status:
    """The worker side of ``status.json`` (state, attempt, progress message), throttled."""

    def __init__(self, folder: Path, plan: RunPlan, plan_index: int) -> None:
        self.path = folder / "status.json"
        folder.mkdir(parents=True, exist_ok=True)
        previous = {}
        if self.path.exists():
            import json

            try:
                previous = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                previous = {}
        self.base = {"run_id": plan.run_id, "name": plan.name, "plan_index": plan_index,
                     "n_stages": len(plan.order) + 1,
                     "attempt": int(previous.get("attempt", 0)) + 1}  # fmt: skip
        self.last = 0.0

    def write(self, state: str, message: str = "", error: str | None = None) -> None:
        self.last = time.monotonic()
        write_json_atomic(self.path, {**self.base, "state": state, "message": message,
                                      "error": error, "host": socket.gethostname(),
                                      "pid": os.getpid(),
                                      "updated_at": dt.datetime.now().isoformat()})  # fmt: skip

    def progress(self, fraction: float, message: str) -> None:
        if time.monotonic() - self.last >= _STATUS_EVERY_S:
            self.write("running", f"{fraction:.0%} {message}")


def _maybe_fault(index: int, folder: Path, plan_index: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    stage, _, only = spec.partition(":")
    if int(stage) != index or (only and int(only) != plan_index):
        return
    marker = folder / ".fault-fired"
    if marker.exists():
        return
    marker.touch()
    os._exit(17)  # a hard death, like a lost node: no cleanup, no exception to Ray


def run_task(plan: RunPlan, config: RunConfig, results_dir: str, plan_index: int) -> dict:
    """Body of one Ray task: run (or resume) ``plan`` writing a segment per committed stage."""
    results = Path(results_dir)
    folder = run_folder(results, plan.study_id, plan.run_id)
    os.environ["COLLAPSE_RUNS_DIR"] = str(results / "runs")
    # The driver queues the trajectory map after ingesting; a scratch DB's queue is discarded.
    config.eval.queue_embeddings = False
    status = _Status(folder, plan, plan_index)
    status.write("running", "starting")
    n_stages = len(plan.order) + 1

    def log(line: str) -> None:
        print(f"[{plan.run_id}] {line}", flush=True)

    with tempfile.TemporaryDirectory(prefix="collapse-worker-") as tmp:
        scratch = Store(Path(tmp) / "scratch.duckdb")
        _register(scratch, config, [plan])
        resumed = find_segments(folder) if folder.exists() else []
        for seg in resumed:
            ingest_segment(scratch, seg)
        if resumed:
            log(f"attempt {status.base['attempt']}: {len(resumed)} committed stage(s) found")

        def on_commit(index: int) -> None:
            write_stage_segment(scratch, plan.run_id, index, folder,
                                {"study_id": plan.study_id, "plan_index": plan_index,
                                 "n_stages": n_stages, "attempt": status.base["attempt"]})  # fmt: skip
            status.write("running", f"stage {index} committed")
            _maybe_fault(index, folder, plan_index)

        try:
            execute_run(plan, config, scratch, status.progress, log, on_commit=on_commit)
        except BaseException as err:
            status.write("failed", error=f"{type(err).__name__}: {err}")
            raise
        stages = len(finished_stages(scratch, plan.run_id))
    status.write("done", f"{stages} stages")
    return {"run_id": plan.run_id, "stages": stages, "attempt": status.base["attempt"]}


def run_study_ray(
    config: RunConfig,
    store: Store,
    results_dir: str | Path | None = None,
    address: str | None = None,
    progress: ProgressFn = _silent,
    log: LogFn = _silent,
    should_stop: Callable[[], bool] | None = None,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> str:
    """Run every (order, seed, arm) of ``config`` as Ray tasks and ingest their segments into
    ``store`` in plan order; returns the study id. Uses the running Ray session if there is one,
    else connects to ``address`` (``auto``, ``ray://host:10001``, ``host:6379``) or starts a
    local cluster. Runs already complete in ``store`` are not resubmitted."""
    ray = import_ray()
    check_before_writing(config)  # as the local executor: refuse before anything is submitted
    results = Path(results_dir) if results_dir is not None else default_results_dir()
    results.mkdir(parents=True, exist_ok=True)
    plans = plan_runs(config)
    _register(store, config, plans)
    if not ray.is_initialized():
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            start_local_cluster()
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    task = ray.remote(run_task).options(
        num_gpus=1 if use_gpu else 0, num_cpus=1, max_retries=max_retries,
        retry_exceptions=False,
    )  # fmt: skip
    pending: dict[Any, int] = {}
    finished: dict[int, str | None] = {}  # plan index -> error text or None
    for i, plan in enumerate(plans):
        if len(finished_stages(store, plan.run_id)) == len(plan.order) + 1:
            finished[i] = None
            continue
        pending[task.remote(plan, config, str(results), i)] = i
        # running, owned by this driver: a Runs page or worker does not reap it while it lives
        lifecycle.claim_run(store, plan.run_id)
    log(f"{len(pending)} run(s) submitted to Ray ({'1 GPU' if use_gpu else '1 CPU'} each), "
        f"{len(plans) - len(pending)} already complete; segments under {results}")  # fmt: skip
    study_folder = results / plans[0].study_id
    next_ingest = 0
    total_stages = sum(len(p.order) + 1 for p in plans)
    while pending or next_ingest < len(plans):
        if pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
        else:
            ready = []
        for ref in ready:
            i = pending.pop(ref)
            try:
                ray.get(ref)
                finished[i] = None
            except Exception as err:  # RayTaskError / WorkerCrashedError after the retries
                finished[i] = str(err).strip().splitlines()[-1][:300]
                log(f"{plans[i].name}: failed: {finished[i]}")
        while next_ingest < len(plans) and next_ingest in finished:
            plan = plans[next_ingest]
            folder = run_folder(results, plan.study_id, plan.run_id)
            if folder.exists():
                report = ingest_folder(store, study_folder, run_order=[plan.run_id])
                log(f"{plan.name}: {report.summary()}")
            if finished[next_ingest] is not None:
                store.execute("UPDATE runs SET status = 'failed' WHERE run_id = ?", [plan.run_id])
            next_ingest += 1
        table = progress_table(results)
        mine = table[table["study_id"] == plans[0].study_id]
        progress(min(1.0, float(mine["stages_done"].sum()) / total_stages),
                 f"{int((mine['state'] == 'done').sum())}/{len(plans)} runs done on Ray")  # fmt: skip
        if should_stop is not None and should_stop():
            for ref in pending:
                ray.cancel(ref, force=True)
            ingest_folder(store, study_folder, run_order=[p.run_id for p in plans])
            raise CollapseError("study cancelled; the stages committed so far were ingested")
    failed = {i: e for i, e in finished.items() if e is not None}
    if failed:
        first = next(iter(failed.values()))
        raise CollapseError(
            f"{len(failed)} of {len(plans)} runs failed after {max_retries} retries (their "
            f"committed stages were ingested; rerun to resume): {first}"
        )
    if config.eval.queue_embeddings:
        for plan in plans:
            n_layers = store.query(
                "SELECT max(c.n_layers) AS n FROM stages s JOIN checkpoints c USING "
                "(checkpoint_id) WHERE s.run_id = ?",
                [plan.run_id],
            )["n"][0]
            _queue_trajectory_map(store, plan, config, int(n_layers), log)
    return plans[0].study_id
