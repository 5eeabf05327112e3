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


store = ui.store()
worker.reap_interrupted(store)
st.title("Runs & jobs")

if READ_ONLY:
    st.info("Read-only view: starting runs and cancelling jobs is switched off.")
else:
    with st.expander("Start a pipeline run", expanded=False):
        form_tab, file_tab = st.tabs(["Build a run", "Shipped config"])
        with form_tab, st.form("pipeline_form"):
            name = st.text_input("Run name", "my-run")
            c1, c2 = st.columns(2)
            model_choice = c1.selectbox("Base model", ["smollm2", "other (path)"])
            model_path = c2.text_input("Base model path (if other)", "")
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
            submitted = st.form_submit_button("Start run", type="primary")
        if submitted:
            config_dict = {
                "run": {
                    "name": name.strip() or "run",
                    "model": "smollm2" if model_choice == "smollm2" else model_path.strip(),
                    "stages": stages, "seeds": [int(seed)], "data_source": data_source,
                },
                "train": {"steps": int(steps), "batch_size": int(batch), "lora_r": int(rank),
                          "lora_alpha": 2 * int(rank), "lr": float(lr)},
                "interventions": {"arms": arms},
            }  # fmt: skip
            try:
                if not stages:
                    raise CollapseError("pick at least one stage")
                if model_choice != "smollm2":
                    from collapse_core.uploads import check_model_path

                    if check_model_path(config_dict["run"]["model"]) == "lora":
                        raise CollapseError("a run starts from a full model, not a LoRA adapter")
                parse_config(config_dict, where="run form")
                _submit(store, {"config_dict": config_dict})
            except CollapseError as err:
                st.error(str(err))
        with file_tab:
            files = sorted((REPO_ROOT / "configs").glob("*.toml"))
            if not files:
                st.caption("No configs/*.toml shipped.")
            else:
                chosen = st.selectbox("Config", files, format_func=lambda p: p.name)
                st.code(chosen.read_text(encoding="utf-8"), language="toml")
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
            if status in queue.ACTIVE:
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
                f"{row.stages_done}/{row.n_stages} stages · {ui.md_escape(str(row.message)[:200])}"
            )
            st.progress(min(max(fraction, 0.0), 1.0), text=text)
            if row.state == "running":
                st.caption(f"ETA {pretty_seconds(_val(row.eta_seconds))}")
            elif row.state == "failed":
                st.error(
                    ui.md_escape((str(row.error or "failed").splitlines() or ["failed"])[0][:300])
                )


job_list()
if not READ_ONLY:  # a viewer must not point the server at arbitrary folders
    st.text_input("Ray results folder", key="ray_results_dir",
                  placeholder="data/results (default), or the shared folder given to --results")  # fmt: skip
ray_runs()
