"""Calibration: reliability diagrams per checkpoint (calibration_bins) with ECE / MCE / Brier
(evals), and out-of-domain accuracy and calibration across the stages of each run."""

from __future__ import annotations

import streamlit as st

from collapse_core import figures, ui, views

OUTCOME_TITLES = {"ood_accuracy": "OOD accuracy", "ood_ece": "OOD ECE (15 bins)",
                  "ood_brier": "OOD Brier score"}  # fmt: skip

store, sel = ui.page(
    "Calibration",
    "Held-out multiple-choice tasks never trained on: the model's option probabilities give a "
    "confidence per question. Points below the diagonal are over-confident.",
)

evals_with_bins = views.calibration_evals(store)
if sel.runs.empty or not evals_with_bins:
    ui.missing("No calibration results yet: they are written by pipeline runs (OOD evaluation "
               "of every stage).", ui.HOW_PIPELINE)  # fmt: skip
    st.stop()

run_labels = dict(zip(sel.runs["run_id"], sel.runs["label"], strict=True))
c1, c2 = st.columns([4, 1])
with c1:
    run_ids = ui.multiselect("Runs", list(run_labels), "runs",
                             default=[sel.run_id] if sel.run_id else sel.run_ids[:1],
                             follow=[sel.run_id] if sel.run_id else None,
                             format_func=lambda r: run_labels.get(r, r))  # fmt: skip
with c2:
    eval_name = ui.select("Evaluation", evals_with_bins, "eval", default="ood")
summary = views.calibration_summary(store, run_ids, eval_name)
if summary.empty:
    ui.missing("Pick at least one run with finished stages.")
    st.stop()

choices = views.checkpoint_choices(store, run_ids=run_ids, include_standalone=False)
labels = dict(zip(choices["key"], choices["label"], strict=True))
keys = ui.multiselect("Checkpoints in the diagram", list(labels), "ckpt",
                      default=list(labels)[:7], format_func=lambda k: labels.get(k, k))  # fmt: skip
left, right = st.columns([1, 1])
with left:
    bins = views.calibration_bins(store, choices[choices["key"].isin(keys)], eval_name)
    ui.chart(figures.reliability_figure(bins), key="reliability")
with right:
    st.caption("Per checkpoint (from `evals`): each score with its 95 % interval over the "
               "n questions (Wilson for accuracy, item bootstrap otherwise). Two stages whose "
               "intervals overlap differ by less than a new draw of questions could.")  # fmt: skip
    shown = views.with_intervals(summary, views.CALIBRATION_METRICS)
    st.dataframe(
        shown[["run_label", "stage_label", "n", *views.CALIBRATION_METRICS]],
        hide_index=True,
        column_config={
            "run_label": "run", "stage_label": "stage",
            "n": st.column_config.NumberColumn("n", format="%d", help="questions scored"),
            "accuracy": st.column_config.TextColumn("accuracy [95 % CI]"),
            "ece": st.column_config.TextColumn("ECE [95 % CI]",
                                               help="expected calibration error, 15 bins"),
            "mce": st.column_config.TextColumn("MCE [95 % CI]",
                                               help="maximum calibration error"),
            "brier": st.column_config.TextColumn("Brier [95 % CI]"),
            "nll": st.column_config.TextColumn("NLL [95 % CI]"),
        },
    )  # fmt: skip

st.subheader("Out-of-domain results across stages")
long = views.outcome_across_stages(store, run_ids, tuple(OUTCOME_TITLES))
ui.chart(figures.outcomes_figure(long, OUTCOME_TITLES), key="ood_stages")
