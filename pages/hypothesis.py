"""Hypothesis: does collapse predict lost plasticity, worse OOD accuracy and calibration?
One verdict per (collapse metric, outcome) from the shared estimator of
collapse_core.hypothesis (within-stage association, permutation p, cluster bootstrap over
independent runs, fixed effects), the scatter behind it, the verdict grid, and the intervention
arms side by side."""

from __future__ import annotations

import numpy as np
import streamlit as st

from collapse_core import figures, ui, views

store, sel = ui.page(
    "Hypothesis",
    "Does a collapse metric go with a worse outcome *among checkpoints of the same stage index* "
    "(different orders, arms, seeds)? Pooling all checkpoints mixes in the stage itself (later "
    "stages differ in everything), so the verdict uses within-stage comparisons; identical "
    "checkpoints (the shared base) count once and runs sharing a trained checkpoint count as "
    "one independent run.",
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
variant = views.metric_variant(x_metric)
if variant:
    st.caption(variant)

feature = f"{x_metric}@{where}"
n_outcome = int(table[outcome].notna().sum()) if outcome in table else 0
if n_outcome == 0:
    ui.missing(f"No checkpoint has '{views.OUTCOMES[outcome]}' yet: runs write it when their "
               "evaluation config measures it (e.g. plasticity_steps > 0).")  # fmt: skip
tests, source = ui.cached(views.hypothesis_tests, sel.study_id, probe_set)
row = views.test_row(tests, x_metric, where, outcome)


def _num(value: float, spec: str = "+.2f") -> str:
    return "n/a" if value is None or not np.isfinite(value) else format(value, spec)


left, right = st.columns([3, 1])
with right:
    if row is None:
        st.metric("Verdict", "n/a")
        st.caption("Fewer than 3 checkpoints have both values.")
    else:
        st.metric("Verdict", row["verdict"])
        st.caption(row["reason"])
        ci = f"[{_num(row['ci_low'])}, {_num(row['ci_high'])}]"
        rho = (f"**{_num(row['within_rho'])}** (95 % CI {ci}, cluster bootstrap over runs)"
               if views.testable(row) else
               f"{_num(row['within_rho'])} (descriptive only: too few independent runs or "
               "within-stage points for a test)")  # fmt: skip
        st.markdown(
            f"- within-stage ρ: {rho}\n- permutation p = {_num(row['p_perm'], '.3f')}, BH q = "
            f"{_num(row['q_value'], '.2f')}\n- fixed-effects β = {_num(row['fe_beta'])} "
            f"(p = {_num(row['fe_p'], '.3f')})\n- pooled ρ (naive) = {_num(row['pooled_rho'])}"
            f"\n- {row['n_lineages']} independent runs, {row['n_within']} within-stage points, "
            f"{row['n_checkpoints']} distinct checkpoints"
        )
        st.caption("Stored by `python -m collapse_core analyze`." if source == "stored" else
                   "Computed now (nothing stored yet; `python -m collapse_core analyze` stores "
                   "it).")  # fmt: skip
with left:
    x_title = f"{views.metric_label(x_metric)} ({where} layer)"
    ui.chart(
        figures.scatter_figure(table, feature, outcome, x_title, views.OUTCOMES[outcome]),
        key="scatter",
    )

st.subheader("Verdicts: all collapse metrics × outcomes")
if tests.empty:
    ui.missing(
        "Not enough checkpoints with outcomes for the test (need ≥ 3).",
        "Run more stages or seeds, then `python -m collapse_core analyze` stores them.",
    )
else:
    st.caption(
        "Colour = within-stage Spearman ρ; supported / contradicted need BH q < 0.05 over all "
        "rows, a cluster-bootstrap CI that excludes 0 and a fixed-effects slope of the same "
        "sign. '_robust' rows drop the 3 largest-variance coordinates (massive activations)."
    )
    titles = {m: views.metric_label(m) for m in views.COLLAPSE_METRICS}
    # Only testable pairs get a colour: with 2 runs ρ is ±1 or 0 by construction.
    ok = tests.apply(views.testable, axis=1) if not tests.empty else []
    grid = tests.assign(spearman=tests["within_rho"].where(ok)).dropna(subset=["spearman"])
    if grid.empty:
        st.caption(":orange[No pair has enough independent runs and within-stage points for a "
                   "test, so the grid stays empty; the table's ρ_w is blank for the same reason.]")  # fmt: skip
    else:
        ui.chart(
            figures.correlation_heatmap(grid, views.OUTCOME_SHORT, views.COLLAPSE_METRICS,
                                        titles),
            key="corr_grid",
        )  # fmt: skip
    st.dataframe(views.verdict_table(tests, where), hide_index=True,
                 column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                for c in ("ρ_w", "CI low", "CI high", "p (perm.)", "q (BH)",
                                          "β_FE", "pooled ρ")})  # fmt: skip

st.subheader("Interventions (end of each chain)")
arms = views.intervention_table(store, sel.study_id, probe_set)
if arms.empty or len(arms) < 2:
    ui.missing("Only one arm in this study: add interventions (replay, refresh, diversity, "
               "O-LoRA) to compare against the baseline.", ui.HOW_PIPELINE)  # fmt: skip
if not arms.empty:
    st.dataframe(arms, hide_index=True,
                 column_config={c: st.column_config.NumberColumn(c, format="%.3f")
                                for c in arms.columns if c not in ("arm", "runs", "final stage")})  # fmt: skip
deltas = ui.cached(views.arm_deltas, sel.study_id, probe_set)
if not deltas.empty:
    st.markdown("**Arm − baseline, paired by order and seed**")
    st.dataframe(deltas, hide_index=True)
    st.caption(f"{views.ARM_NOTE} {views.ARM_READING}")
