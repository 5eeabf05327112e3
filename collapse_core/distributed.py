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
from .errors import Cancelled, CollapseError
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
    drop_stage_segments,
    find_segments,
    ingest_folder,
    ingest_segment,
    progress_table,
    run_folder,
    write_json_atomic,
    write_probe_segment,
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


def _connect(ray: Any, address: str | None) -> None:
    """Use the running Ray session, else join ``address``, else start a local cluster."""
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        start_local_cluster()


def _task(ray: Any, body: Callable[..., Any], max_retries: int) -> tuple[Any, bool]:
    """``body`` as a Ray task asking for 1 GPU when the cluster has GPUs, else 1 CPU, retried
    ``max_retries`` times when its worker dies (an exception raised by the body is final: a
    bad checkpoint fails the same way twice). A fault spec in the driver's environment
    (:data:`FAULT_ENV`, tests) is passed to the task's workers. Returns (task, uses GPU)."""
    use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    options: dict[str, Any] = {"num_gpus": 1 if use_gpu else 0, "num_cpus": 1,
                               "max_retries": max_retries, "retry_exceptions": False}  # fmt: skip
    if os.environ.get(FAULT_ENV):
        options["runtime_env"] = {"env_vars": {FAULT_ENV: os.environ[FAULT_ENV]}}
    return ray.remote(body).options(**options), use_gpu


def _error_line(err: BaseException) -> str:
    """The last line of a Ray task error (the worker's own exception), shortened."""
    return str(err).strip().splitlines()[-1][:300]


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
    _connect(ray, address)
    task, use_gpu = _task(ray, run_task, max_retries)
    pending: dict[Any, int] = {}
    finished: dict[int, str | None] = {}  # plan index -> error text or None
    claimed: list[str] = []  # runs this driver owns until they are ingested and released
    try:
        for i, plan in enumerate(plans):
            if len(finished_stages(store, plan.run_id)) == len(plan.order) + 1:
                finished[i] = None
                continue
            # running, owned by this driver: a Runs page or worker does not reap it while it
            # lives; released (done / failed) once its segments are ingested
            lifecycle.claim_run(store, plan.run_id)
            claimed.append(plan.run_id)
            pending[task.remote(plan, config, str(results), i)] = i
        return _drive_study(ray, store, config, plans, results, pending, finished, claimed,
                            use_gpu, progress, log, should_stop, max_retries)  # fmt: skip
    except BaseException as err:
        for ref in pending:
            ray.cancel(ref, force=True)
        lifecycle.release_runs_after(store, claimed, err)
        raise


def _drive_study(
    ray: Any,
    store: Store,
    config: RunConfig,
    plans: list[RunPlan],
    results: Path,
    pending: dict[Any, int],
    finished: dict[int, str | None],
    claimed: list[str],
    use_gpu: bool,
    progress: ProgressFn,
    log: LogFn,
    should_stop: Callable[[], bool] | None,
    max_retries: int,
) -> str:
    """Wait for the study's tasks, ingest each run's segments in plan order and release the
    run (``done``, or ``failed`` with its error) as soon as it is ingested."""
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
                finished[i] = _error_line(err)
                log(f"{plans[i].name}: failed: {finished[i]}")
        while next_ingest < len(plans) and next_ingest in finished:
            plan = plans[next_ingest]
            folder = run_folder(results, plan.study_id, plan.run_id)
            if folder.exists():
                report = ingest_folder(store, study_folder, run_order=[plan.run_id])
                log(f"{plan.name}: {report.summary()}")
            if plan.run_id in claimed:  # ingested: done (all stages) or failed, claim dropped
                error = finished[next_ingest]
                lifecycle.release_run(store, plan.run_id, lifecycle.FAILED if error else
                                      lifecycle.DONE, error or "done")  # fmt: skip
                claimed.remove(plan.run_id)
            next_ingest += 1
        table = progress_table(results)
        mine = table[table["study_id"] == plans[0].study_id]
        progress(min(1.0, float(mine["stages_done"].sum()) / total_stages),
                 f"{int((mine['state'] == 'done').sum())}/{len(plans)} runs done on Ray")  # fmt: skip
        if should_stop is not None and should_stop():
            for ref in pending:
                ray.cancel(ref, force=True)
            pending.clear()
            ingest_folder(store, study_folder, run_order=[p.run_id for p in plans])
            raise Cancelled("study cancelled; the stages committed so far were ingested")
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


# -- track and multi-model probes on Ray -----------------------------------------------------
def track_task(
    entries: list[Any], index: int, name: str, settings: Any, results_dir: str
) -> dict[str, Any]:
    """Body of one Ray task of a tracked series: checkpoint ``index`` probed (and evaluated)
    into a private scratch DB by the local path's own step
    (:func:`collapse_core.track.track_checkpoint`), committed there as stage ``index``, and
    written as that stage's immutable segment. Weight-update rows reload the checkpoints they
    compare against (W_0, W_{k-1}, W_{k-2}), so a task needs nothing from another task."""
    from dataclasses import asdict

    from .track import eval_data, register_series, track_checkpoint

    labels = [e.label for e in entries]
    with tempfile.TemporaryDirectory(prefix="collapse-track-") as tmp:
        scratch = Store(Path(tmp) / "scratch.duckdb")
        plan = register_series(scratch, name, labels, settings.describe(), claim=False)
        stage = track_checkpoint(scratch, plan, entries, index, settings, {},
                                 eval_data(name, settings))  # fmt: skip
        folder = run_folder(results_dir, plan.study_id, plan.run_id)
        segment = write_stage_segment(scratch, plan.run_id, index, folder,
                                      {"study_id": plan.study_id, "plan_index": 0,
                                       "n_stages": len(entries)})  # fmt: skip
        _maybe_fault(index, folder, 0)
    return {**asdict(stage), "segment": str(segment)}


def track_ray(
    entries: list[Any],
    name: str,
    store: Store,
    settings: Any = None,
    results_dir: str | Path | None = None,
    address: str | None = None,
    progress: ProgressFn = _silent,
    log: LogFn = _silent,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> list[Any]:
    """:func:`collapse_core.track.track` with one Ray task per checkpoint not yet committed
    (:func:`track_task`); the driver ingests the stage segments in series order, so the stored
    rows are those of a local track. The series' run is claimed by this driver and, however
    the sweep ends, marked done / failed / cancelled / interrupted with its claim released."""
    from .track import (
        TrackedStage,
        TrackSettings,
        checkpoint_ids,
        register_series,
        resume_point,
        settings_change,
    )

    ray = import_ray()
    settings = settings or TrackSettings()
    results = Path(results_dir) if results_dir is not None else default_results_dir()
    results.mkdir(parents=True, exist_ok=True)
    changed = settings_change(store, name, settings.describe())
    plan = register_series(store, name, [e.label for e in entries], settings.describe())
    with lifecycle.released_run(store, plan.run_id):
        out, first_new = resume_point(store, plan.run_id, entries,
                                      checkpoint_ids(entries, settings), settings, log,
                                      changed)  # fmt: skip
        folder = run_folder(results, plan.study_id, plan.run_id)
        if drop_stage_segments(folder, first_new):  # left by an earlier series of this name
            log(f"dropped the old segments of stage {first_new} on")
        if first_new == len(entries):
            return out  # every checkpoint already tracked: no cluster needed
        _connect(ray, address)
        task, use_gpu = _task(ray, track_task, max_retries)
        refs = {task.remote(list(entries), i, name, settings, str(results)): i
                for i in range(first_new, len(entries))}  # fmt: skip
        log(f"{len(refs)} checkpoint(s) submitted to Ray ({'1 GPU' if use_gpu else '1 CPU'} "
            f"each), {first_new} already tracked; segments under {folder}")  # fmt: skip
        done: dict[int, dict | str] = {}
        try:
            pending = dict(refs)
            next_ingest = first_new
            while next_ingest < len(entries):
                if pending:
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
                    for ref in ready:
                        i = pending.pop(ref)
                        try:
                            done[i] = ray.get(ref)
                        except Exception as err:  # the task's error, or its worker lost
                            done[i] = _error_line(err)
                            log(f"{i}:{entries[i].label}: failed: {done[i]}")
                # stage order: a failed checkpoint stops the series there, as locally
                while next_ingest in done and isinstance(done[next_ingest], dict):
                    result = done[next_ingest]
                    ingest_segment(store, Path(result.pop("segment")))
                    out.append(TrackedStage(**result))
                    log(f"{next_ingest}:{entries[next_ingest].label} "
                        f"{result['seconds']:.1f} s on Ray, ingested")  # fmt: skip
                    next_ingest += 1
                    progress(next_ingest / len(entries), f"{next_ingest} checkpoints tracked")
                if isinstance(done.get(next_ingest), str):
                    raise CollapseError(
                        f"checkpoint {next_ingest} ({entries[next_ingest].label}) failed on Ray "
                        f"after {max_retries} retries: {done[next_ingest]}; the "
                        f"{next_ingest} checkpoint(s) before it are stored"
                    )
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    return out


def probe_task(
    spec: str,
    base: str | None,
    probe_sets: list[str],
    config: Any,
    device: str,
    allow_pickle: bool,
    results_dir: str,
) -> dict[str, Any]:
    """Body of one Ray task of a multi-model probe: load ``spec`` (:func:`load_model`), run
    :func:`collapse_core.probing.probe` on every probe set into a private scratch DB and write
    each probe as an immutable segment (:func:`segments.write_probe_segment`)."""
    from .models import load_model
    from .probing import probe

    loaded = load_model(spec, base, device, allow_pickle=allow_pickle, verbose=False)
    probes = []
    with tempfile.TemporaryDirectory(prefix="collapse-probe-") as tmp:
        scratch = Store(Path(tmp) / "scratch.duckdb")
        for name in probe_sets:
            result = probe(loaded, name, config, store=scratch)
            segment = write_probe_segment(scratch, result.probe_key, results_dir, {"spec": spec})
            probes.append({"probe_key": result.probe_key, "probe_set": result.probe_set,
                           "seconds": result.seconds, "segment": str(segment)})  # fmt: skip
    return {"spec": spec, "checkpoint_id": loaded.checkpoint_id, "cached": False,
            "summary": f"{loaded.name}: {loaded.architecture}, {loaded.n_layers} layers, "
                       f"d={loaded.d_model}, {loaded.n_params / 1e6:.1f}M params, checkpoint "
                       f"{loaded.checkpoint_id}, device {loaded.device}",
            "probes": probes}  # fmt: skip


def probe_models_ray(
    specs: list[str],
    probe_sets: list[str],
    config: Any,
    store: Store,
    base: str | None = None,
    device: str = "auto",
    allow_pickle: bool = False,
    force: bool = False,
    results_dir: str | Path | None = None,
    address: str | None = None,
    log: LogFn = _silent,
    max_retries: int = DEFAULT_MAX_RETRIES,
) -> list[dict[str, Any]]:
    """Probe several models, one Ray task each (:func:`probe_task`), and ingest their probe
    segments into ``store``; returns one dict per spec (in order): checkpoint_id, cached,
    summary, probes (probe_key, probe_set, seconds). A model whose every probe is stored (its
    checkpoint id read from file hashes, :func:`peek_checkpoint_id`) is a cache hit, as
    locally, unless ``force``. Models that fail are reported after the others are ingested."""
    from .models import peek_checkpoint_id
    from .probesets import load_probe_set
    from .probing import probe_key

    ray = import_ray()
    results = Path(results_dir) if results_dir is not None else default_results_dir()
    results.mkdir(parents=True, exist_ok=True)
    sets = [load_probe_set(name) for name in probe_sets]  # a bad name fails before submitting
    out: list[dict[str, Any] | None] = [None] * len(specs)
    todo = []
    for i, spec in enumerate(specs):
        ckpt = peek_checkpoint_id(spec, base)
        keys = [probe_key(ckpt, pset, config) for pset in sets] if ckpt else []
        if ckpt and not force and all(store.has_probe(k) for k in keys):
            out[i] = {"spec": spec, "checkpoint_id": ckpt, "cached": True,
                      "summary": f"{spec}: checkpoint {ckpt}, every probe set stored",
                      "probes": [{"probe_key": k, "probe_set": p.name, "seconds": 0.0}
                                 for k, p in zip(keys, sets, strict=True)]}  # fmt: skip
        else:
            todo.append(i)
    errors: list[str] = []
    if todo:
        _connect(ray, address)
        task, use_gpu = _task(ray, probe_task, max_retries)
        pending = {task.remote(specs[i], base, list(probe_sets), config, device, allow_pickle,
                               str(results)): i for i in todo}  # fmt: skip
        log(f"{len(pending)} model(s) submitted to Ray ({'1 GPU' if use_gpu else '1 CPU'} "
            f"each), {len(specs) - len(todo)} cached; segments under {results / 'probes'}")  # fmt: skip
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=2.0)
                for ref in ready:
                    i = pending.pop(ref)
                    try:
                        result = ray.get(ref)
                    except Exception as err:  # the task's error, or its worker lost
                        errors.append(f"{specs[i]}: {_error_line(err)}")
                        log(f"{specs[i]}: failed: {_error_line(err)}")
                        continue
                    for p in result["probes"]:
                        ingest_segment(store, Path(p.pop("segment")))
                    out[i] = result
                    log(f"{specs[i]}: {len(result['probes'])} probe(s) ingested")
        except BaseException:
            for ref in pending:
                ray.cancel(ref, force=True)
            raise
    if errors:
        raise CollapseError(f"{len(errors)} of {len(specs)} models failed on Ray (the others "
                            f"are stored): {errors[0]}")  # fmt: skip
    return [r for r in out if r is not None]
