"""Runs & jobs: start a pipeline run (form or shipped config) and follow every background job.

Jobs run in worker processes outside the script run; this page only submits, reads and asks
for cancellation. The job list refreshes itself every 2 s.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd
import streamlit as st

from collapse_core import ui
from collapse_core.errors import CollapseError
from collapse_core.jobs import queue, worker
from collapse_core.names import INTERVENTIONS, STAGES
from collapse_core.paths import REPO_ROOT
from collapse_core.runconfig import load_config, parse_config
from collapse_core.store import Store
from collapse_core.views import pretty_seconds

LR_CHOICES = [1e-5, 3e-5, 1e-4, 2e-4, 3e-4, 5e-4, 1e-3, 3e-3]
READ_ONLY = ui.readonly()


def _val(value: Any) -> Any:
    """None for SQL NULL / NaN, else the value."""
    try:
        return None if value is None or pd.isna(value) else value
    except (TypeError, ValueError):
        return value


def _what(kind: str, spec_json: str | None) -> str:
    """One line about a job's spec (plain text; a corrupt spec gives an empty string)."""
    spec = queue.decode_spec(spec_json)
    if kind == "probe":
        sets = spec.get("probe_sets")
        sets = ", ".join(os.path.basename(str(s)) for s in sets) if isinstance(sets, list) else ""
        return f"{os.path.basename(str(spec.get('model', '')).rstrip('/'))} · {sets}"
    if kind == "pipeline":
        if spec.get("config"):
            return os.path.basename(str(spec["config"]))
        config = spec.get("config_dict")
        run = config.get("run") if isinstance(config, dict) else None
        run = run if isinstance(run, dict) else {}
        stages = run.get("stages")
        stages = "→".join(map(str, stages)) if isinstance(stages, list) else ""
        return f"{run.get('name', 'run')} · {stages}"
    return ""


def _submit(store: Store, spec: dict) -> None:
    job_id = queue.submit(store, "pipeline", spec)
    worker.ensure_worker(store)
    st.success(f"Queued pipeline job {job_id}; it appears in the job list below.")


def _run_form() -> None:
    """The run builder: plain widgets (not an ``st.form``), so the model check and the time
    estimate follow every change before **Start run**."""
    from collapse_core.estimates import estimate_run

    name = st.text_input("Run name", "my-run", key="run_name")
    model, problem = ui.model_input("Base model", "run_model")
    stages = st.multiselect(
        "Stage order (in the order you pick them)", list(STAGES), default=list(STAGES)
    )
    c1, c2, c3, c4, c5 = st.columns(5)
    steps = c1.number_input("Steps per stage", 1, 100_000, 24)
    batch = c2.number_input("Batch size", 1, 4096, 4)
    rank = c3.number_input("LoRA rank", 1, 1024, 8)
    lr = c4.select_slider("Learning rate", LR_CHOICES, value=3e-4,
                          format_func=lambda v: f"{v:.0e}")  # fmt: skip
    seed = c5.number_input("Seed", 0, 2**31 - 1, 0)
    data_source = st.radio(
        "Training data", ["full", "sample"], horizontal=True,
        help="full: the packaged datasets; sample: tiny in-repo samples (smoke test)",
    )  # fmt: skip
    st.markdown("Interventions (each one is an extra arm compared against the baseline)")
    cols = st.columns(len(INTERVENTIONS))
    arms = ["baseline"] + [
        arm for col, arm in zip(cols, INTERVENTIONS, strict=True) if col.checkbox(arm)
    ]
    if not problem and stages:
        guess = estimate_run(store, model, len(stages), int(steps), int(batch), n_runs=len(arms))
        when = f"about {pretty_seconds(guess.seconds)}" if guess.seconds is not None else "unknown"
        st.caption(f"Estimated time: **{when}** ({guess.basis}).")
    if not st.button("Start run", type="primary", key="start_run"):
        return
    config_dict = {
        "run": {"name": name.strip() or "run", "model": model, "stages": stages,
                "seeds": [int(seed)], "data_source": data_source},
        "train": {"steps": int(steps), "batch_size": int(batch), "lora_r": int(rank),
                  "lora_alpha": 2 * int(rank), "lr": float(lr)},
        "interventions": {"arms": arms},
    }  # fmt: skip
    try:
        if not stages:
            raise CollapseError("pick at least one stage")
        if problem:
            raise CollapseError(problem)
        parse_config(config_dict, where="run form")
        _submit(store, {"config_dict": config_dict})
    except CollapseError as err:
        st.error(str(err))


def _config_estimate(path: Any) -> None:
    """The time estimate of a shipped config, from stored stage timings."""
    from collapse_core.estimates import estimate_run

    try:
        config = load_config(path)
    except CollapseError as err:
        st.error(str(err))
        return
    n_runs = len(config.orders) * len(config.seeds) * len(config.arms)
    guess = estimate_run(store, config.model, len(config.orders[0]), config.train.steps,
                         config.train.batch_size, n_runs=n_runs,
                         eval_settings=config.raw)  # fmt: skip
    when = f"about {pretty_seconds(guess.seconds)}" if guess.seconds is not None else "unknown"
    st.caption(f"{n_runs} run(s) of model `{config.model}` · estimated time: **{when}** "
               f"({guess.basis}).")  # fmt: skip


store = ui.store()
worker.reap_interrupted(store)
st.title("Runs & jobs")

if READ_ONLY:
    st.info("Read-only view: starting runs and cancelling jobs is switched off.")
else:
    with st.expander("Start a pipeline run", expanded=False):
        form_tab, file_tab = st.tabs(["Build a run", "Shipped config"])
        with form_tab:
            _run_form()
        with file_tab:
            files = sorted((REPO_ROOT / "configs").glob("*.toml"))
            if not files:
                st.caption("No configs/*.toml shipped.")
            else:
                chosen = st.selectbox("Config", files, format_func=lambda p: p.name)
                st.code(chosen.read_text(encoding="utf-8"), language="toml")
                _config_estimate(chosen)
                if st.button(f"Start {chosen.name}", key="start_config"):
                    try:
                        load_config(chosen)
                        _submit(store, {"config": str(chosen)})
                    except CollapseError as err:
                        st.error(str(err))


@st.fragment(run_every=2)
def job_list() -> None:
    """Every recent job with progress, ETA, message, log tail and a Cancel button."""
    df = queue.list_jobs(store, limit=30)
    if df.empty:
        st.caption("No jobs yet. Start a run above or probe a model.")
        return
    active = df[df["status"].isin(queue.ACTIVE)]
    if (active["status"] == queue.QUEUED).any() and not worker.worker_alive(store):
        st.warning("Jobs are queued but no worker is running.")
        if not READ_ONLY and st.button("Start a worker", key="start_worker"):
            worker.ensure_worker(store)
    st.subheader(f"Jobs ({len(active)} active)")
    for row in df.itertuples(index=False):
        status = row.status
        with st.container(border=True):
            left, right = st.columns([6, 1])
            left.markdown(
                f"**{ui.md_escape(row.kind)}** {ui.md_escape(row.job_id)} · "
                f"{ui.md_escape(status)} · {ui.md_escape(_what(row.kind, row.spec_json))}"
            )
            message = ui.md_escape(str(_val(row.message) or "")[:300])
            asked = _val(row.cancel_requested_at) if bool(_val(row.cancel_requested)) else None
            if status == queue.RUNNING and asked is not None:
                waited = (queue.now() - asked).total_seconds()
                left.warning(
                    f"cancelling… asked {pretty_seconds(waited)} ago; it stops at its next batch, "
                    f"or is stopped by force {worker.cancel_grace_s():.0f} s after the request"
                )
                left.caption(message)
            elif status in queue.ACTIVE:
                fraction = float(_val(row.progress) or 0.0)
                left.progress(min(max(fraction, 0.0), 1.0), text=f"{fraction:.0%} · {message}")
                eta = _val(row.eta_seconds)
                left.caption(f"ETA {pretty_seconds(eta)}" if status == queue.RUNNING else "waiting")
                if not READ_ONLY:
                    right.button("Cancel", key=f"cancel-{row.job_id}",
                                 on_click=queue.request_cancel, args=(store, row.job_id))  # fmt: skip
            elif status == queue.FAILED:
                failure = str(_val(row.error) or _val(row.message) or "failed").splitlines()
                left.error(ui.md_escape((failure or ["failed"])[0][:300]))
            elif status in (queue.CANCELLED, queue.INTERRUPTED):
                left.caption(message)
            else:
                started, finished = _val(row.started_at), _val(row.finished_at)
                took = (finished - started).total_seconds() if started and finished else None
                left.caption(f"done in {pretty_seconds(took)}")
            log = _val(row.log_tail)
            if log:
                with st.expander("log"):
                    st.code(log, language=None)


@st.fragment(run_every=5)
def ray_runs() -> None:
    """Runs executed on Ray (``run --executor ray``): per run the stages its segments hold,
    the worker's state and an ETA, read from the results folder (the workers never touch the DB)."""
    from collapse_core import views
    from collapse_core.paths import results_dir

    folder = st.session_state.get("ray_results_dir") or str(results_dir())
    table = views.ray_progress(folder)
    if table.empty:
        return
    st.subheader(f"Ray runs ({int((table['state'] == 'running').sum())} running)")
    st.caption(ui.md_escape(f"from the segments under {folder}; python -m collapse_core ingest "
                            f"{folder} merges finished stages into the database (the Ray driver "
                            "does it as runs end)"))  # fmt: skip
    for row in table.itertuples(index=False):
        with st.container(border=True):
            st.markdown(
                f"**{ui.md_escape(row.name)}** {ui.md_escape(row.run_id)} · "
                f"{ui.md_escape(row.state)} · attempt {ui.md_escape(row.attempt)}"
            )
            fraction = row.stages_done / row.n_stages if row.n_stages else 0.0
            text = (
                f"{row.stages_done}/{row.n_stages} stages · "
                f"{ui.md_escape(str(_val(row.message) or '')[:200])}"
            )
            st.progress(min(max(fraction, 0.0), 1.0), text=text)
            if row.state == "running":
                st.caption(f"ETA {pretty_seconds(_val(row.eta_seconds))}")
            elif row.state == "failed":
                st.error(
                    ui.md_escape((str(row.error or "failed").splitlines() or ["failed"])[0][:300])
                )


job_list()


@st.fragment(run_every=2)
def run_list() -> None:
    """Every recent run, whether a job, the CLI or a script started it, with its owner."""
    from collapse_core import lifecycle

    df = lifecycle.run_activity(store, limit=30)
    st.subheader(f"Runs ({int((df['status'] == lifecycle.RUNNING).sum())} running)")
    if df.empty:
        st.caption(
            "No pipeline runs yet (from this page, a job, or `python -m collapse_core run`)."
        )
        return
    for row in df[df["status"] == lifecycle.RUNNING].itertuples(index=False):
        with st.container(border=True):
            left, right = st.columns([6, 1])
            left.markdown(f"**{ui.md_escape(row.name)}** {ui.md_escape(row.run_id)} · running · "
                          f"{ui.md_escape(row.owner)}")  # fmt: skip
            fraction = float(_val(row.progress) or 0.0)
            text = ui.md_escape(str(_val(row.message) or "")[:200])
            left.progress(min(max(fraction, 0.0), 1.0), text=f"{fraction:.0%} · {text}")
            beat = _val(row.heartbeat_age_s)
            left.caption(f"stages {row.stages} · heartbeat {pretty_seconds(beat)} ago")
            if bool(row.cancel_requested):
                left.warning("cancelling… it stops at its next batch")
            elif not READ_ONLY:
                right.button("Cancel", key=f"cancel-run-{row.run_id}",
                             on_click=_cancel_run, args=(row.run_id, _val(row.owner_job_id)))  # fmt: skip
    rest = df[df["status"] != lifecycle.RUNNING]
    if not rest.empty:
        # A run nobody claimed (an older database, a script) shows when it was registered.
        started = rest["claimed_at"].fillna(rest["created_at"])
        shown = rest[["name", "status", "stages", "owner", "message", "run_id"]]
        st.dataframe(
            shown.assign(message=shown["message"].fillna(""), claimed_at=started)[
                ["name", "status", "stages", "owner", "message", "claimed_at", "run_id"]
            ],  # no "None" for a missing message or start
            hide_index=True,
            column_config={
                "claimed_at": st.column_config.DatetimeColumn("started", format="YYYY-MM-DD HH:mm"),
                "message": st.column_config.TextColumn("message", width="large"),
            },
        )  # fmt: skip


def _cancel_run(run_id: str, job_id: str | None) -> None:
    from collapse_core import lifecycle

    lifecycle.request_run_cancel(store, run_id)
    if job_id:
        queue.request_cancel(store, job_id)


run_list()
if not READ_ONLY:  # a viewer must not point the server at arbitrary folders
    st.text_input("Ray results folder", key="ray_results_dir",
                  placeholder="data/results (default), or the shared folder given to --results")  # fmt: skip
ray_runs()
