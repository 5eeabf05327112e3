"""Every bad input gives a one-line error via the CLI and the app's upload path, and leaves the
database unchanged in content (catalogue in collapse_core/faults.py)."""

from __future__ import annotations

import pytest

from collapse_core.devtools import faults
from collapse_core.store import Store
from tiny_models import make_tiny_model

WIDE = "tiny_wide"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    mp = pytest.MonkeyPatch()
    mp.setenv("COLLAPSE_DATA", str(root / "data"))
    mp.setenv("COLLAPSE_MAX_EXTRACT_MB", "256")
    tiny, wide = root / "tiny", root / WIDE
    make_tiny_model("llama", path=tiny, seed=0)
    faults._make_wide(wide)
    store = Store(root / "faults.duckdb")
    faults.seed_store(store, tiny)
    yield root, store, faults.bad_inputs(tiny, wide)
    mp.undo()


def test_catalogue_has_at_least_sixty_cases(env):
    _, _, cases = env
    assert len(cases) >= 60
    assert len({c.name for c in cases}) == len(cases)


@pytest.mark.parametrize("index", range(100))
def test_bad_input_rejected_cleanly(env, index):
    root, store, cases = env
    if index >= len(cases):
        pytest.skip("catalogue shorter than the parametrisation")
    case = cases[index]
    folder = faults.materialise(case, root / "cases")
    before = store.table_hashes()
    ok_cli, msg_cli = faults.run_cli_case(case, folder, store.path)
    assert ok_cli, f"{case.name}: CLI gave {msg_cli!r}"
    ok_app, msg_app = faults.run_app_case(case, folder, store)
    assert ok_app, f"{case.name}: app path gave {msg_app!r}"
    assert store.table_hashes() == before, f"{case.name} changed the database"
    assert faults.children_alive() == [], f"{case.name} left processes running"
    if case.marker:
        assert not (folder / case.marker).exists(), "the pickle's code ran"
    uploads = root / "data" / "uploads"
    outside = [p for p in root.rglob("evil.json")]
    assert not outside, f"wrote outside the data dir: {outside}"
    assert uploads.exists() or case.upload is None
