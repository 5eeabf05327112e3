"""Weight updates: per stage and module, the effective rank of ΔW (LoRA: ΔW = (α/r) BA; full
fine-tuning: ΔW = W_after − W_before), intruder dimensions, and the subspace overlap /
principal angles between the updates of different stages, with the method each stage used."""

from __future__ import annotations

import streamlit as st

from collapse_core import figures, ui, views

SHORT = {
    "effective_rank": "eff. rank", "stable_rank": "stable rank", "update_rank": "rank",
    "relative_update_norm": "‖ΔW‖/‖W‖", "frobenius_norm": "‖ΔW‖_F", "spectral_norm": "‖ΔW‖₂",
    "intruder_dimensions": "intruders", "intruder_dimensions_cumulative": "intruders",
    "subspace_overlap": "overlap", "principal_angle_mean": "rad", "principal_angle_min": "rad",
}  # fmt: skip
LABELS = {
    "effective_rank": "effective rank of ΔW",
    "stable_rank": "stable rank of ΔW",
    "update_rank": "numerical rank of ΔW",
    "relative_update_norm": "‖ΔW‖ / ‖W‖",
    "frobenius_norm": "‖ΔW‖_F",
    "spectral_norm": "‖ΔW‖₂",
    "intruder_dimensions": "intruder dimensions (vs stage start)",
    "intruder_dimensions_cumulative": "intruder dimensions (vs chain start)",
    "subspace_overlap": "subspace overlap ‖U₁ᵀU₂‖²_F / min(r₁, r₂)",
    "principal_angle_mean": "mean principal angle (rad)",
    "principal_angle_min": "smallest principal angle (rad)",
}
SUMMARY = ["effective_rank", "relative_update_norm", "intruder_dimensions"]

store, sel = ui.page(
    "Weight updates: LoRA and full fine-tuning",
    "What each stage wrote into the weights. Overlapping update subspaces across stages mean "
    "later stages overwrite the directions earlier ones used; intruder dimensions are new "
    "high-ranking singular vectors of the tuned weight (Shuttleworth et al. 2024, who find "
    "them after LoRA but rarely after full fine-tuning).",
)

runs_with = views.lora_runs(store, sel.study_id)
if not runs_with:
    ui.missing("No LoRA-update metrics yet: pipeline runs write them after every trained stage.",
               ui.HOW_PIPELINE)  # fmt: skip
    st.stop()

labels = {r: sel.run_label(r) for r in runs_with}
run_id = ui.select("Run", runs_with, "lora_run",
                   default=sel.run_id if sel.run_id in runs_with else runs_with[0],
                   follow=sel.run_id,
                   format_func=lambda r: labels.get(r, r))  # fmt: skip

methods = views.stage_methods(store, run_id)
st.caption("Training method: " + ", ".join(
    f"{stage} {views.METHOD_LABELS.get(m, m)}" for stage, m in methods.items()) + ".")  # fmt: skip
if "full" in methods.values():
    st.caption("Full fine-tuning: ΔW = W_after − W_before of the same target modules LoRA "
               "adapts; it is typically of full rank, so the comparisons between stages use "
               "its top-r singular directions (r = the config's lora_r).")  # fmt: skip

summary = views.lora_stage_summary(store, run_id)
ui.chart(
    figures.lora_summary_figure(summary, SUMMARY, {m: LABELS.get(m, m) for m in SUMMARY}),
    key="lora_summary",
)
st.caption("Bars: mean over adapted modules per stage.")

st.subheader("Per stage and module")
per_update = views.lora_metric_names(store, run_id)
metric = ui.select("Metric", per_update, "lora_metric", default="effective_rank",
                   format_func=lambda m: LABELS.get(m, m))  # fmt: skip
matrix = views.lora_update_table(store, run_id, metric)
ui.chart(
    figures.heatmap_figure(
        matrix, None, SHORT.get(metric, metric), "module", "stage", top_down=True
    ),
    key="lora_modules",
)

st.subheader("Between stages")
pairwise = views.lora_metric_names(store, run_id, pairwise=True)
if not pairwise:
    ui.missing("Only one trained stage so far: subspace overlap needs two.")
else:
    c1, c2 = st.columns(2)
    with c1:
        pair_metric = ui.select("Comparison", pairwise, "pair_metric",
                                default="subspace_overlap",
                                format_func=lambda m: LABELS.get(m, m))  # fmt: skip
    with c2:
        modules = ["(mean over modules)", *views.lora_modules(store, run_id)]
        module = ui.select("Module", modules, "module", format_func=views.short_module)
    pair = views.lora_pair_matrix(store, run_id, pair_metric,
                                  None if module == modules[0] else module, full=False)  # fmt: skip
    overlap = pair_metric == "subspace_overlap"
    ui.chart(
        figures.heatmap_figure(pair, None, SHORT.get(pair_metric, pair_metric), "earlier stage",
                               "stage", colorscale="Magma" if overlap else "Viridis",
                               zmin=0.0, zmax=1.0 if overlap else None, fmt=".2f",
                               top_down=True),
        key="lora_pairs",
    )  # fmt: skip
    st.caption(f"{LABELS.get(pair_metric, pair_metric)} of each stage's update with every "
               "earlier stage's, on the top-r left singular subspaces. Overlap 1 = one column "
               "space contains the other, 0 = orthogonal; random rank-r subspaces of an n-dim "
               "space overlap ≈ r/n.")  # fmt: skip
