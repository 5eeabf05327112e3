"""Export a report: the study picked in the sidebar is the one exported, and two studies of the
same name are told apart by model, date and arms (AppTest on a real study database)."""

from __future__ import annotations

import datetime as dt
import shutil

from streamlit.testing.v1 import AppTest
from study_db import cached_study_db

from collapse_core import views
from collapse_core.paths import REPO_ROOT
from collapse_core.store import Store, dumps


def test_export_uses_the_sidebar_study_and_labels_tell_studies_apart(tmp_path, monkeypatch):
    study = cached_study_db()
    db = tmp_path / "two.duckdb"
    shutil.copy(study["db"], db)
    store = Store(db)
    first = views.studies(store).iloc[0]
    # a second study with the same name, another model and arm, a day later
    store.execute("INSERT INTO studies VALUES ('study-other0001', ?, ?, ?)",
                  [first["name"], dumps({"run": {"model": "/models/my-llama"}}),
                   first["created_at"] + dt.timedelta(days=1)])  # fmt: skip
    store.execute("INSERT INTO runs (run_id, study_id, name, arm, seed, status) "
                  "VALUES ('run-other', 'study-other0001', 'x', 'replay', 0, 'done')")  # fmt: skip
    labels = views.studies(store).set_index("study_id")["label"]
    assert labels["study-other0001"].startswith(f"{first['name']} · my-llama · ")
    assert labels["study-other0001"].endswith(" · replay")
    assert labels["study-other0001"] != labels[study["study_id"]]

    monkeypatch.setenv("COLLAPSE_DB", str(db))
    monkeypatch.setenv("COLLAPSE_NO_AUTOPROBE", "1")
    for picked in (study["study_id"], "study-other0001"):
        at = AppTest.from_file(str(REPO_ROOT / "pages" / "report.py"), default_timeout=60)
        at.query_params["study"] = picked
        at.run()
        assert not at.exception, at.exception
        assert at.selectbox(key="report_scope").value == picked
    assert any("my-llama" in option for option in at.sidebar.selectbox[0].options)
