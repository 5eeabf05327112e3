"""Spectra: covariance eigenvalue spectra per layer (log-log, checkpoints overlaid, α-ReQ fit
lines) and a layer × checkpoint heatmap of effective rank (or any layer metric)."""

from __future__ import annotations

import streamlit as st

from collapse_core import figures, ui, views

store, sel = ui.page(
    "Spectra",
    "Eigenvalues λᵢ of the hidden-state covariance at one layer, largest first. A steeper decay "
    "(larger α in λᵢ ∝ i^−α) means variance concentrated in fewer directions: lower rank.",
)

picked, probe_set, _ = ui.pick_checkpoints(store, sel)

n_layers = views.n_layers_of(store, probe_set, list(picked["checkpoint_id"]))
layer = ui.select_slider("Layer", list(range(n_layers)), "layer", default=views.mid_layer(n_layers),
                         help="0 = token embeddings; the last layer is the final block's output")  # fmt: skip
spec, fits, lines = views.spectrum_panel(store, probe_set, int(layer), picked)
ui.chart(figures.spectra_figure(spec, lines, fits, int(layer)), key="spectra")
if not fits.empty:
    with st.expander("α-ReQ fits at this layer"):
        st.dataframe(
            fits.drop(columns=["key", "intercept"]),
            hide_index=True,
            column_config={
                "label": "checkpoint",
                "alpha": st.column_config.NumberColumn("α (fit shown)", format="%.3f"),
                "r2": st.column_config.NumberColumn("R²", format="%.3f"),
                "start": st.column_config.NumberColumn("from i", format="%d"),
                "stop": st.column_config.NumberColumn("to i", format="%d"),
                "alpha_stored": st.column_config.NumberColumn("α stored", format="%.3f"),
                "r2_stored": st.column_config.NumberColumn("R² stored", format="%.3f"),
            },
        )  # fmt: skip
        st.caption(
            "Fit range: indices 1 … min(usable, ⌊d/2⌋) — the top half of the spectrum, "
            "as stored by the probe (`collapse_core.metrics.alpha_req_from_eigenvalues`)."
        )

st.subheader("Layer × checkpoint heatmap")
metrics = views.metric_names(store)
metric = ui.select("Metric", metrics, "heat_metric", default="effective_rank",
                   format_func=views.metric_label)  # fmt: skip
st.caption(views.metric_definition(metric))
matrix = views.metric_heatmap(store, metric, probe_set, picked)
ui.chart(
    figures.heatmap_figure(matrix, None, views.metric_label(metric), "checkpoint", "layer"),
    key="heatmap",
)
