"""Compare checkpoints against a reference: the data behind the Compare page.

Selections are :func:`collapse_core.views.checkpoint_choices` frames (key, label, checkpoint_id,
...). With reference checkpoint r and every other checkpoint c:

- Δ metric per layer: m_c(ℓ) − m_r(ℓ) of one stored layer metric, each checkpoint's newest
  probe of the probe set (:func:`metric_deltas`; :func:`delta_matrix` is its layer × checkpoint
  heatmap);
- spectra ratio: λ_i(c) / λ_i(r) of the covariance eigenvalues at one layer, index by index (1 =
  unchanged; < 1 where c lost variance along its i-th direction) (:func:`spectra_ratios`);
- linear CKA (Kornblith et al. 2019, :func:`collapse_core.metrics.linear_cka`) between every
  pair of checkpoints at one layer on the token sample they share: rows are matched on
  (prompt, position, token id) of the stored ``token_samples``, so two probes with the same
  probe set, config and tokenizer compare the hidden states of identical tokens
  (:func:`cka_matrix`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .catalog import latest_probes
from .store import Store, decode_vectors
from .views import layer_curves, spectra


def _reference_rows(frame: pd.DataFrame, reference_key: str, on: str) -> pd.DataFrame:
    ref = frame[frame["key"] == reference_key][[on, "value"]]
    return ref.rename(columns={"value": "reference"})


def metric_deltas(
    store: Store, metric: str, probe_set: str, selection: pd.DataFrame, reference_key: str
) -> pd.DataFrame:
    """Per (checkpoint ≠ reference, layer): key, label, layer, value, reference, delta."""
    cols = ["key", "label", "layer", "value", "reference", "delta"]
    curves = layer_curves(store, metric, probe_set, selection)
    if curves.empty or reference_key not in set(curves["key"]):
        return pd.DataFrame(columns=cols)
    df = curves.merge(_reference_rows(curves, reference_key, "layer"), on="layer")
    df = df[df["key"] != reference_key].copy()
    df["delta"] = df["value"] - df["reference"]
    return df[cols].reset_index(drop=True)


def delta_matrix(deltas: pd.DataFrame) -> pd.DataFrame:
    """Layer × checkpoint matrix of :func:`metric_deltas` (columns in selection order)."""
    if deltas.empty:
        return pd.DataFrame()
    wide = deltas.pivot(index="layer", columns="label", values="delta")
    return wide[list(dict.fromkeys(deltas["label"]))].sort_index()


def spectra_ratios(
    store: Store, probe_set: str, layer: int, selection: pd.DataFrame, reference_key: str
) -> pd.DataFrame:
    """Per (checkpoint ≠ reference, index i): key, label, idx, ratio = λ_i / λ_i(reference);
    only indices where both eigenvalues are positive."""
    cols = ["key", "label", "idx", "ratio"]
    spec = spectra(store, probe_set, layer, selection).rename(columns={"eigenvalue": "value"})
    if spec.empty or reference_key not in set(spec["key"]):
        return pd.DataFrame(columns=cols)
    df = spec.merge(_reference_rows(spec, reference_key, "idx"), on="idx")
    df = df[(df["key"] != reference_key) & (df["value"] > 0) & (df["reference"] > 0)].copy()
    df["ratio"] = df["value"] / df["reference"]
    return df[cols].reset_index(drop=True)


def _samples_and_vectors(
    store: Store, probe_keys: list[str], layer: int
) -> dict[str, pd.DataFrame | np.ndarray]:
    marks = ",".join("?" * len(probe_keys))
    samples = store.query(
        f"SELECT probe_key, sample_idx, prompt_idx, position, token_id FROM token_samples "
        f"WHERE probe_key IN ({marks}) ORDER BY probe_key, sample_idx",
        probe_keys,
    )
    vectors = store.query(
        f"SELECT probe_key, n, d, data FROM token_vectors WHERE probe_key IN ({marks}) "
        f"AND layer = ?",
        [*probe_keys, int(layer)],
    )
    out: dict[str, pd.DataFrame | np.ndarray] = {}
    for row in vectors.itertuples():
        out[row.probe_key] = decode_vectors(bytes(row.data), int(row.n), int(row.d))
        out[row.probe_key + "/samples"] = samples[samples["probe_key"] == row.probe_key]
    return out


def cka_matrix(
    store: Store, probe_set: str, layer: int, selection: pd.DataFrame
) -> tuple[pd.DataFrame, int]:
    """K × K linear CKA between the selected checkpoints at ``layer`` and the number of shared
    tokens it is computed on (NaN for checkpoints without stored vectors at that layer)."""
    from .metrics import linear_cka

    if selection.empty:
        return pd.DataFrame(), 0
    keys = latest_probes(store, list(selection["checkpoint_id"].unique()), probe_set)
    by_ckpt = dict(zip(keys["checkpoint_id"], keys["probe_key"], strict=True))
    labels = list(selection["label"])
    pkeys = [by_ckpt.get(c) for c in selection["checkpoint_id"]]
    data = _samples_and_vectors(store, [k for k in dict.fromkeys(pkeys) if k], layer)
    present = [k for k in dict.fromkeys(pkeys) if k in data]
    tokens = ["prompt_idx", "position", "token_id"]
    shared = None
    for k in present:
        rows = data[k + "/samples"][tokens]
        shared = rows if shared is None else shared.merge(rows, on=tokens)
    matrix = pd.DataFrame(np.nan, index=labels, columns=labels)
    n_shared = 0 if shared is None else len(shared)
    if n_shared < 3:
        return matrix, n_shared
    aligned: dict[str, np.ndarray] = {}
    for k in present:
        samples = data[k + "/samples"].reset_index(drop=True).reset_index()
        # a left merge keeps the shared tokens' order, so row t is the same token everywhere
        position = shared.merge(samples, on=tokens, how="left")["index"].to_numpy()
        aligned[k] = data[k][position]
    for i, a in enumerate(pkeys):
        for j, b in enumerate(pkeys):
            if a in aligned and b in aligned and j >= i:
                value = 1.0 if a == b else float(linear_cka(aligned[a], aligned[b]))
                matrix.iloc[i, j] = matrix.iloc[j, i] = value
    return matrix, n_shared
