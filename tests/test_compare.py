"""The compare views (Δ per layer, Δ heatmap, spectrum ratio, linear CKA matrix) on the fixture
database, checked against the stored values they are computed from."""

from __future__ import annotations

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from collapse_core import compare, views
from collapse_core.metrics import linear_cka
from collapse_core.paths import REPO_ROOT
from collapse_core.store import Store


@pytest.fixture(scope="module")
def picked(observatory_db):
    store = Store(observatory_db["db"])
    choices = views.checkpoint_choices(store, run_ids=["run-obs-base"], include_standalone=False)
    return store, choices


def test_metric_deltas_are_differences_to_the_reference(picked):
    store, sel = picked
    ref = sel["key"].iloc[0]
    deltas = compare.metric_deltas(store, "effective_rank", "general", sel, ref)
    assert ref not in set(deltas["key"]) and len(set(deltas["key"])) == len(sel) - 1
    curves = views.layer_curves(store, "effective_rank", "general", sel)
    wide = curves.pivot(index="layer", columns="key", values="value")
    for row in deltas.itertuples():
        assert row.delta == pytest.approx(wide.loc[row.layer, row.key] - wide.loc[row.layer, ref])
    matrix = compare.delta_matrix(deltas)
    assert list(matrix.columns) == list(sel["label"].iloc[1:])
    assert matrix.shape[0] == curves["layer"].nunique()


def test_spectra_ratios(picked):
    store, sel = picked
    ref = sel["key"].iloc[0]
    ratios = compare.spectra_ratios(store, "general", 1, sel, ref)
    spec = views.spectra(store, "general", 1, sel).set_index(["key", "idx"])["eigenvalue"]
    row = ratios.iloc[3]
    assert row["ratio"] == pytest.approx(spec[(row["key"], row["idx"])] / spec[(ref, row["idx"])])
    assert (ratios["ratio"] > 0).all()


def test_cka_matrix_on_shared_tokens(picked):
    store, sel = picked
    matrix, n_shared = compare.cka_matrix(store, "general", 1, sel)
    assert n_shared > 10
    values = matrix.to_numpy()
    assert np.allclose(np.diag(values), 1.0)
    assert np.allclose(values, values.T)
    assert ((values > 0) & (values <= 1 + 1e-9)).all()
    # recompute one entry from the stored vectors directly (same sample, same order)
    keys = views.latest_probes(store, list(sel["checkpoint_id"]), "general")
    by = dict(zip(keys["checkpoint_id"], keys["probe_key"], strict=True))
    a, b = (store.token_vectors(by[c], 1) for c in sel["checkpoint_id"].iloc[:2])
    assert values[0, 1] == pytest.approx(float(linear_cka(a, b)), rel=1e-5)


def test_compare_page_reference_choice(observatory_db, app_env):
    app_env["use"](observatory_db["db"])
    at = AppTest.from_file(str(REPO_ROOT / "pages" / "compare.py"), default_timeout=90)
    at.run()
    assert not at.exception and not at.error
    ref = next(s for s in at.selectbox if s.label == "Reference")
    new = ref.options[-1]
    ref.set_value(new).run()
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 4
    shown = set(at.dataframe[0].value["label"])
    assert new not in shown and len(shown) == len(ref.options) - 1
