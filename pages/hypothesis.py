"""Hypothesis: does collapse predict lost plasticity, worse OOD accuracy and calibration?
Scatter of any collapse metric vs an outcome across the study's checkpoints with Spearman ρ and
a bootstrap CI, the full correlation grid, and the intervention arms side by side."""

from __future__ import annotations

import numpy as np
import streamlit as st

from collapse_core import figures, ui, views

store = ui.store()
sel = ui.selection(store)
st.title("Hypothesis")
st.caption(
    "Across every checkpoint of the study (each stage of each run), rank correlation between a "
    "collapse metric and an outcome. Few checkpoints → wide intervals: read the CI, not ρ alone."
)

if sel.study_id is None:
    ui.missing("No pipeline study yet: the hypothesis test needs a chain of stages with "
               "evaluations.", ui.HOW_PIPELINE)  # fmt: skip
    st.stop()

cat = views.stage_catalog(store, study_id=sel.study_id)
sets = views.probe_sets(store, list(cat["checkpoint_id"].unique())) if not cat.empty else []
if not sets:
    ui.missing("The study has no probed stages yet.", ui.HOW_PIPELINE)
    st.stop()

c1, c2, c3, c4 = st.columns([2, 1, 2, 1])
with c4:
    probe_set = ui.select("Probe set", sets, "probe_set", default="general")
table = ui.cached(views.checkpoint_outcomes, sel.study_id, probe_set)
present = [m for m in views.COLLAPSE_METRICS if f"{m}@mean" in table]
with c1:
    x_metric = ui.select("Collapse metric", present, "x", default="effective_rank",
                         format_func=views.metric_label)  # fmt: skip
with c2:
    where = ui.select("at layer", list(views.LAYER_POSITIONS), "at", default="mid")
with c3:
    outcome = ui.select("Outcome", list(views.OUTCOMES), "y", default="ood_accuracy",
                        format_func=lambda o: views.OUTCOME_SHORT[o],
                        help="; ".join(views.OUTCOMES.values()))  # fmt: skip
if table.empty or x_metric is None:
    ui.missing("No checkpoints with collapse metrics in this study yet.")
    st.stop()

feature = f"{x_metric}@{where}"
n_outcome = int(table[outcome].notna().sum()) if outcome in table else 0
if n_outcome == 0:
    ui.missing(f"No checkpoint has '{views.OUTCOMES[outcome]}' yet: runs write it when their "
               "evaluation config measures it (e.g. plasticity_steps > 0).")  # fmt: skip
r = ui.cached(views.correlation_for, sel.study_id, table, feature, outcome)
left, right = st.columns([3, 1])
with right:
    rho = "n/a" if not np.isfinite(r["rho"]) else f"{r['rho']:+.2f}"
    st.metric("Spearman ρ", rho)
    if np.isfinite(r["ci_low"]):
        st.caption(f"95 % bootstrap CI [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}], n = {r['n']} "
                   f"checkpoints ({r['source']}).")  # fmt: skip
    else:
        st.caption(f"n = {r['n']} checkpoints with both values; ρ needs at least 3 that vary.")
with left:
    x_title = f"{views.metric_label(x_metric)} ({where} layer)"
    st.plotly_chart(
        figures.scatter_figure(table, feature, outcome, x_title, views.OUTCOMES[outcome]),
        key="scatter",
    )

st.subheader("All collapse metrics × outcomes")
corr, source = ui.cached(views.correlation_table, sel.study_id, probe_set)
if corr.empty:
    ui.missing(
        "Not enough checkpoints with outcomes for correlations (need ≥ 3).",
        "Run more stages or seeds, then `python -m collapse_core analyze` stores them.",
    )
else:
    st.caption("From the `correlations` table (`python -m collapse_core analyze`)."
               if source == "stored" else
               "Computed on the fly (nothing stored yet; `python -m collapse_core analyze` "
               "stores them).")  # fmt: skip
    titles = {m: views.metric_label(m) for m in views.COLLAPSE_METRICS}
    st.plotly_chart(
        figures.correlation_heatmap(corr, views.OUTCOME_SHORT, views.COLLAPSE_METRICS, titles),
        key="corr_grid",
    )
    with st.expander("Table"):
        st.dataframe(corr, hide_index=True)

st.subheader("Interventions (end of each chain)")
arms = views.intervention_table(store, sel.study_id, probe_set)
if arms.empty or len(arms) < 2:
    ui.missing("Only one arm in this study: add interventions (replay, refresh, diversity, "
               "O-LoRA) to compare against the baseline.", ui.HOW_PIPELINE)  # fmt: skip
if not arms.empty:
    st.dataframe(arms, hide_index=True,
                 column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                for c in arms.columns if c not in ("arm", "runs", "final stage")})  # fmt: skip
if any(c.startswith("Δ") for c in arms.columns):
    st.caption(
        "Δ = arm − baseline (means over runs). For collapse, higher effective rank and "
        "lower anisotropy are better; for plasticity and ECE, lower is better."
    )
