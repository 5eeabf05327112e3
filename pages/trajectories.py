"""Token trajectories: UMAP maps of the stored token samples, (a) across the stages of a run at
one layer (AlignedUMAP: one shared map, each token's path drawn) and (b) across the layers of
one checkpoint. Maps are computed by a background job and cached; this page only reads them."""

from __future__ import annotations

import dataclasses

import streamlit as st

from collapse_core import embeddings, figures, ui, views
from collapse_core.errors import CollapseError
from collapse_core.jobs import queue, worker

METHODS = {"aligned_umap": "AlignedUMAP (PCA-50 first)", "pca": "PCA preview (fast, linear)"}
COLOR_BY = {"domain": "domain", "probe_set": "probe set", "slice": "stage / layer"}

store, sel = ui.page(
    "Token trajectories",
    "The same sampled tokens, embedded at every stage (or layer) in one aligned 2-D map. Tokens "
    "drifting together into a few tight clumps is what collapse looks like; hover a point for "
    "its token and prompt.",
)

if views.is_empty(store):
    ui.missing("No probe results, so no token samples to embed.", ui.HOW_PROBE)
    st.stop()

has_runs = not views.stage_catalog(store, study_id=sel.study_id).empty
modes = ["across stages", "across layers"] if has_runs else ["across layers"]
if not has_runs:
    st.caption("No pipeline runs yet, so only the across-layers view is available. "
               + ui.HOW_PIPELINE)  # fmt: skip
c1, c2 = st.columns([2, 3])
with c1:
    mode = ui.radio("Map", modes, "mode")
with c2:
    method = ui.radio("Method", list(METHODS), "method", format_func=METHODS.get)

if mode == "across stages":
    run_labels = dict(zip(sel.runs["run_id"], sel.runs["label"], strict=True))
    c1, c2, c3 = st.columns([2, 2, 3])
    with c1:
        run_id = ui.select("Run", list(run_labels), "traj_run", default=sel.run_id,
                           follow=sel.run_id, format_func=lambda r: run_labels.get(r, r))  # fmt: skip
    cat = views.stage_catalog(store, [run_id])
    ckpts = list(cat["checkpoint_id"].unique())
    with c2:
        probe_sets = ui.multiselect("Probe sets", views.probe_sets(store, ckpts), "sets",
                                    default=["general"])  # fmt: skip
    n_layers = views.n_layers_of(store, probe_sets[0], ckpts) if probe_sets else 0
    with c3:
        layer = ui.select_slider("Layer", list(range(n_layers)), "layer",
                                 default=views.mid_layer(n_layers))  # fmt: skip
    spec = embeddings.EmbeddingSpec(mode="stages", probe_sets=tuple(probe_sets), run_id=run_id,
                                    layer=None if layer is None else int(layer), method=method)  # fmt: skip
else:
    choices = views.checkpoint_choices(store, study_id=sel.study_id)
    labels = dict(zip(choices["key"], choices["label"], strict=True))
    c1, c2 = st.columns([2, 3])
    with c1:
        key = ui.select("Checkpoint", list(labels), "ckpt", format_func=lambda k: labels.get(k, k))
    ckpt = choices.loc[choices["key"] == key, "checkpoint_id"].iloc[0]
    with c2:
        probe_sets = ui.multiselect("Probe sets", views.probe_sets(store, [ckpt]), "sets",
                                    default=["general"])  # fmt: skip
    n_layers = views.n_layers_of(store, probe_sets[0], [ckpt]) if probe_sets else 0
    layers = ui.multiselect("Layers", list(range(n_layers)), "layers",
                            default=embeddings.default_layers(n_layers))  # fmt: skip
    spec = embeddings.EmbeddingSpec(mode="layers", probe_sets=tuple(probe_sets),
                                    checkpoint_id=ckpt, layers=tuple(sorted(layers)),
                                    method=method)  # fmt: skip

if not probe_sets:
    ui.missing("Pick at least one probe set.")
    st.stop()
if spec.mode == "layers" and not spec.layers:
    ui.missing("Pick at least one layer.")
    st.stop()
try:
    emb_key = embeddings.embedding_key(store, spec)
    slices = embeddings.resolve(store, spec)
except CollapseError as err:
    ui.error_box(err)
    st.stop()

if embeddings.is_cached(store, emb_key):
    emb = embeddings.load_embedding(store, spec)
    c1, c2 = st.columns([2, 3])
    with c1:
        color_by = ui.radio("Colour by", list(COLOR_BY), "color", format_func=COLOR_BY.get)
    with c2:
        n_tokens = emb["token_id"].nunique()
        choices = [v for v in (0, 25, 50, 100, 150, 250, 500, 1000) if v < n_tokens]
        choices.append(n_tokens)  # never offer more paths than there are tokens
        max_paths = ui.select_slider("Token paths drawn", choices, "paths",
                                     default=min(100, n_tokens) if 100 in choices else n_tokens)  # fmt: skip
    tab_paths, tab_panels = st.tabs(["Paths (one map)", "One panel per " + (
        "stage" if spec.mode == "stages" else "layer")])  # fmt: skip
    with tab_paths:
        ui.chart(figures.embedding_paths_figure(emb, color_by, int(max_paths)),
                        key="emb_paths")  # fmt: skip
        st.caption(f"{n_tokens} tokens × {len(slices)} {'stages' if spec.mode == 'stages' else 'layers'}"
                   f" ({slices[0].label} → {slices[-1].label}); open circles = first, large dots = "
                   f"last; thin lines = the paths of {min(int(max_paths), n_tokens)} tokens. "
                   f"Method: {METHODS[spec.method]}.")  # fmt: skip
    with tab_panels:
        ui.chart(figures.embedding_facets_figure(emb, color_by), key="emb_panels")
    st.stop()

# -- not computed yet ----------------------------------------------------------------------
job = views.job_for_key(store, "embedding", "key", emb_key)
if job is not None and job["status"] in queue.ACTIVE:
    st.write(f"Computing this map in the background ({len(slices)} slices) …")
    if not ui.readonly():
        worker.ensure_worker(store)

    @st.fragment(run_every=2)
    def _progress() -> None:
        current = views.job_for_key(store, "embedding", "key", emb_key) or job
        if current["status"] not in queue.ACTIVE or embeddings.is_cached(store, emb_key):
            st.rerun()
        ui.job_progress(current, "embedding ")

    _progress()
    st.stop()

if spec.method != "pca":
    preview = dataclasses.replace(spec, method="pca")
    if embeddings.is_cached(store, embeddings.embedding_key(store, preview)):
        st.caption("A PCA preview of this selection is cached: pick **PCA preview** above to "
                   "see it now.")  # fmt: skip
if job is not None and job["status"] in ("failed", "interrupted"):
    ui.error_box(f"The last embedding job {job['status']}: {job.get('error') or job['message']}")
est = embeddings.estimate_seconds(len(slices), min(spec.max_tokens, 512 * len(probe_sets)),
                                  spec.method)  # fmt: skip
ui.missing(
    f"This map is not computed yet ({len(slices)} {'stages' if spec.mode == 'stages' else 'layers'}"
    f", {', '.join(probe_sets)}). It runs as a background job — about "
    f"{views.pretty_seconds(est)} on 2 CPU cores — and is cached for everyone afterwards.",
    None if not ui.readonly() else "Read-only viewer: ask the owner of this database to compute "
    "it (or run `python -m collapse_core worker` after queuing it).",
)  # fmt: skip
if not ui.readonly() and st.button("Compute this map", type="primary", key="compute_embedding"):
    embeddings.submit(store, spec)
    worker.ensure_worker(store)
    st.rerun()
