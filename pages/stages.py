"""Anisotropy & rank across stages: any layer metric as curves across the stages of a chain
(one line per layer or layer group) and across layers (one line per stage), for one run or
baseline vs intervention arms side by side / overlaid."""

from __future__ import annotations

import streamlit as st

from collapse_core import figures, ui, views

store, sel = ui.page(
    "Anisotropy & rank across stages",
    "Does each post-training stage squeeze the representation? Rising anisotropy / top-PC "
    "share or falling effective rank from stage to stage is collapse; the opposite is expansion.",
)

if sel.runs.empty or views.stage_catalog(store, study_id=sel.study_id).empty:
    ui.missing("No pipeline runs with finished stages yet.", ui.HOW_PIPELINE)
    st.caption("Single checkpoints can be inspected on the **Spectra** page.")
    st.stop()

run_labels = dict(zip(sel.runs["run_id"], sel.runs["label"], strict=True))
default_runs = sel.run_ids if len(sel.run_ids) <= 4 else [sel.run_id]
c1, c2, c3 = st.columns([3, 2, 1])
with c1:
    # Up to 4 runs all show; beyond that the sidebar's run is the one shown, and follows it.
    run_ids = ui.multiselect("Runs to compare", list(run_labels), "runs", default=default_runs,
                             follow=None if len(sel.run_ids) <= 4 else [sel.run_id],
                             format_func=lambda r: run_labels.get(r, r))  # fmt: skip
cat = views.stage_catalog(store, run_ids)
sets = views.probe_sets(store, list(cat["checkpoint_id"].unique())) if not cat.empty else []
with c2:
    metric = ui.select("Metric", views.metric_names(store), "metric",
                       default="anisotropy_cosine", format_func=views.metric_label)  # fmt: skip
    st.caption(views.metric_definition(metric))
with c3:
    probe_set = ui.select("Probe set", sets, "probe_set", default="general")
if cat.empty or probe_set is None:
    ui.missing("Pick at least one run with finished, probed stages.")
    st.stop()

side = True
if len(run_ids) > 1:
    side = ui.radio("Runs shown", ["side by side", "overlaid"], "layout") == "side by side"
y_title = views.metric_label(metric)
n_layers = views.n_layers_of(store, probe_set, list(cat["checkpoint_id"].unique()))

st.subheader("Across stages")
c1, c2 = st.columns([2, 3])
with c1:
    mode = ui.radio("One line per", ["layer group", "chosen layer"], "lines",
                    default="layer group" if n_layers > 8 else "chosen layer")  # fmt: skip
with c2:
    if mode == "layer group":
        groups = ui.select_slider("Groups (contiguous layers averaged)",
                                  list(range(1, min(n_layers, 8) + 1)), "groups",
                                  default=min(4, n_layers))  # fmt: skip
        layers = None
    else:
        groups = None
        picks = [0, views.mid_layer(n_layers), n_layers - 1]
        layers = ui.multiselect("Layers", list(range(n_layers)), "layers",
                                default=sorted(set(picks)))  # fmt: skip
curves = views.stage_curves(store, metric, probe_set, run_ids, layers=layers or None,
                            n_groups=groups)  # fmt: skip
ui.chart(figures.stage_curves_figure(curves, y_title, side), key="across_stages")
st.caption(" ".join(filter(None, [views.metric_variant(metric), views.noise_note(curves)])))

st.subheader("Across layers")
depth = views.depth_curves(store, metric, probe_set, run_ids)
ui.chart(figures.depth_curves_figure(depth, y_title, side), key="across_layers")
with st.expander("Values"):
    table = depth.pivot_table(index=["run_label", "stage_label"], columns="layer",
                              values="value", sort=False)  # fmt: skip
    st.dataframe(table, column_config={"_index": "run · stage"})
