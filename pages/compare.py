"""Compare checkpoints: every checkpoint as a difference to a chosen reference (Δ metric per
layer, its heatmap, the spectrum ratio) and the K × K linear CKA between checkpoints."""

from __future__ import annotations

import numpy as np
import streamlit as st

from collapse_core import compare, figures, ui, views

store, sel = ui.page(
    "Compare checkpoints",
    "Pick a reference checkpoint; every other one is shown as its difference to it. Linear CKA "
    "compares the hidden states of the very same tokens (1 = same geometry up to rotation and "
    "scale).",
)

picked, probe_set, labels = ui.pick_checkpoints(store, sel, min_picked=2, n_default=6)

c1, c2, c3 = st.columns([2, 2, 2])
with c1:
    reference = ui.select("Reference", list(picked["key"]), "ref", default=picked["key"].iloc[0],
                          format_func=lambda k: labels.get(k, k))  # fmt: skip
with c2:
    metric = ui.select("Metric", views.metric_names(store), "metric", default="effective_rank",
                       format_func=views.metric_label)  # fmt: skip
n_layers = views.n_layers_of(store, probe_set, list(picked["checkpoint_id"]))
with c3:
    layer = ui.select_slider("Layer", list(range(max(n_layers, 1))), "layer",
                             default=views.mid_layer(n_layers))  # fmt: skip
ref_label = labels.get(reference, str(reference))
name = views.metric_label(metric)

deltas = compare.metric_deltas(store, metric, probe_set, picked, reference)
left, right = st.columns(2)
with left:
    ui.chart(
        figures.layer_curves_figure(
            deltas.rename(columns={"value": "raw", "delta": "value"}), f"Δ {name}",
            f"Δ {name} vs {ref_label}",
        ),
        key="delta_curves",
    )  # fmt: skip
with right:
    matrix = compare.delta_matrix(deltas)
    bound = float(np.nanmax(np.abs(matrix.to_numpy()))) if not matrix.empty else 1.0
    ui.chart(
        figures.heatmap_figure(matrix, f"Δ {name} (layer × checkpoint)", f"Δ {name}",
                               "checkpoint", "layer", colorscale="RdBu_r", zmin=-bound or None,
                               zmax=bound or None),
        key="delta_heatmap",
    )  # fmt: skip

left, right = st.columns(2)
with left:
    ratios = compare.spectra_ratios(store, probe_set, int(layer), picked, reference)
    ui.chart(figures.spectra_ratio_figure(ratios, ref_label, int(layer)), key="ratio")
with right:
    cka, n_shared = compare.cka_matrix(store, probe_set, int(layer), picked)
    ui.chart(
        # colour range from the values: after short fine-tuning CKA often stays above 0.99
        figures.heatmap_figure(cka, f"Linear CKA, layer {layer}", "CKA", "checkpoint",
                               "checkpoint", fmt=".4f", zmax=1.0, top_down=True),
        key="cka",
    )  # fmt: skip
    st.caption(f"On {n_shared} tokens shared by every checkpoint's stored sample.")

with st.expander("Δ values"):
    st.dataframe(deltas, hide_index=True)
