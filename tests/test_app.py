"""AppTest runs of the browse pages (and app.py navigation) against the fixture database and an
empty one. No worker is ever started (``app_env`` replaces ``worker.ensure_worker``)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from streamlit.testing.v1 import AppTest

from collapse_core.jobs import queue
from collapse_core.paths import REPO_ROOT
from collapse_core.store import Store

TIMEOUT = 90

# page file → (plotly charts, dataframes) expected at least on the fixture database
PAGES = {
    "overview.py": (3, 3),
    "spectra.py": (2, 1),
    "compare.py": (4, 1),
    "stages.py": (2, 1),
    "trajectories.py": (0, 0),  # default method (AlignedUMAP) is not cached in the fixture
    "calibration.py": (2, 1),
    "lora.py": (3, 0),
    "hypothesis.py": (1, 2),  # the scatter; the verdict grid needs ≥ 3 runs, the fixture has 2
}
# page file → a phrase of its "missing, here's how" message on an empty database
EMPTY_HINT = {
    "overview.py": "python -m collapse_core probe",
    "spectra.py": "python -m collapse_core probe",
    "compare.py": "python -m collapse_core probe",
    "stages.py": "python -m collapse_core run configs/demo.toml",
    "trajectories.py": "python -m collapse_core probe",
    "calibration.py": "python -m collapse_core run configs/demo.toml",
    "lora.py": "python -m collapse_core run configs/demo.toml",
    "hypothesis.py": "python -m collapse_core run configs/demo.toml",
}


def _page(name: str, query: dict | None = None) -> AppTest:
    at = AppTest.from_file(str(REPO_ROOT / "pages" / name), default_timeout=TIMEOUT)
    for key, value in (query or {}).items():
        at.query_params[key] = value
    at.run()
    return at


def _qp(at: AppTest, key: str) -> list[str]:
    value = at.query_params[key]
    return [value] if isinstance(value, str) else list(value)


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


@pytest.mark.parametrize("name", list(PAGES))
def test_page_renders_fixture_db(name, observatory_db, app_env):
    app_env["use"](observatory_db["db"])
    at = _page(name)
    _ok(at)
    charts, frames = PAGES[name]
    assert len(at.get("plotly_chart")) >= charts
    assert len(at.dataframe) >= frames
    assert at.title, "every page has a title"
    assert app_env["started"] == []
    # every figure: the toolbar's camera saves SVG, and an SVG / PDF menu sits under it
    shown = at.get("plotly_chart")
    for chart in shown:
        assert json.loads(chart.proto.config)["toImageButtonOptions"]["format"] == "svg"
    labels = [b.proto.label for b in at.get("download_button")]
    assert labels.count("SVG") == labels.count("PDF") == len(shown), labels


@pytest.mark.parametrize("name", list(EMPTY_HINT))
def test_page_empty_db_says_what_is_missing(name, empty_db, app_env):
    app_env["use"](empty_db)
    at = _page(name)
    _ok(at)
    assert not at.get("plotly_chart")
    text = " ".join(i.value for i in at.info)
    assert EMPTY_HINT[name] in text, text
    assert queue.list_jobs(Store(empty_db)).empty, "no job without autoprobe"


def test_overview_first_run_submits_one_probe_and_shows_progress(empty_db, app_env, monkeypatch):
    monkeypatch.delenv("COLLAPSE_NO_AUTOPROBE")
    app_env["use"](empty_db)
    at = _page("overview.py")
    _ok(at)
    df = queue.list_jobs(Store(empty_db))
    assert list(df["kind"]) == ["probe"]
    assert json.loads(df["spec_json"][0]) == {
        "model": "smollm2", "probe_sets": ["general", "math", "code", "refusal"]
    }  # fmt: skip
    assert app_env["started"] == ["w"]
    assert at.get("progress"), "progress bar of the first probe"
    assert "SmolLM2" in " ".join(m.value for m in at.markdown)
    at.run()
    at2 = _page("overview.py")
    _ok(at2)
    assert len(queue.list_jobs(Store(empty_db))) == 1, "submitted once"
    # the demo pipeline button queues the pipeline job
    at2.button(key="demo_first_run").click().run()
    _ok(at2)
    df = queue.list_jobs(Store(empty_db))
    pipeline = df[df["kind"] == "pipeline"]
    assert len(pipeline) == 1
    assert json.loads(pipeline["spec_json"].iloc[0]) == {"config": "configs/demo.toml"}


def test_overview_first_run_failed_job_offers_retry(empty_db, app_env, monkeypatch):
    monkeypatch.delenv("COLLAPSE_NO_AUTOPROBE")
    store = Store(empty_db)
    job_id = queue.submit(store, "probe", {"model": "smollm2", "probe_sets": ["general"]})
    store.execute("UPDATE jobs SET status = 'failed', error = 'no network' WHERE job_id = ?",
                  [job_id])  # fmt: skip
    app_env["use"](empty_db)
    at = _page("overview.py")
    assert not at.exception
    assert len(at.error) == 1 and "no network" in at.error[0].value
    assert "\n" not in at.error[0].value
    assert len(queue.list_jobs(store)) == 1, "a failed first probe is not resubmitted by itself"
    at.button(key="retry_first_probe").click().run()
    assert len(queue.list_jobs(store)) == 2


def test_overview_shows_sandboxed_generations(observatory_db, app_env):
    app_env["use"](observatory_db["db"])
    at = _page("overview.py")
    _ok(at)
    box = at.selectbox(key="qp:generation")
    labels = box.options  # as displayed
    # 3 stages x 2 problems, plus the replay run's base stage (the same checkpoint)
    assert len(labels) == 8 and labels[0].endswith("HumanEval/1 · passed")
    assert at.code[0].value.rstrip() == "def task_1_stage_0():\n    return 0"
    at.selectbox(key="qp:generation").set_value(5).run()
    _ok(at)
    assert at.code[0].value.rstrip() == "def task_2_stage_2():\n    return 2"


def test_read_only_hides_run_controls(empty_db, observatory_db, app_env, monkeypatch):
    monkeypatch.setenv("COLLAPSE_READONLY", "1")
    monkeypatch.delenv("COLLAPSE_NO_AUTOPROBE")
    app_env["use"](empty_db)
    at = _page("overview.py")
    _ok(at)
    assert not at.button and queue.list_jobs(Store(empty_db)).empty
    app_env["use"](observatory_db["db"])
    at = _page("overview.py")
    _ok(at)
    assert not at.button
    at = _page("trajectories.py")  # the uncached default map: no "compute" button
    _ok(at)
    assert not at.button and "Read-only" in " ".join(i.value for i in at.info)


def test_query_params_restore_and_follow_selections(observatory_db, app_env):
    app_env["use"](observatory_db["db"])
    key = "run-obs-replay/2"
    at = _page("spectra.py", {"layer": "0", "heat_metric": "stable_rank", "ckpt": [key],
                              "probe_set": "math"})  # fmt: skip
    _ok(at)
    assert at.multiselect(key="qp:ckpt").value == [key]
    assert at.select_slider(key="qp:layer").value == 0
    assert at.selectbox(key="qp:heat_metric").value == "stable_rank"
    assert at.selectbox(key="qp:probe_set").value == "math"
    at.select_slider(key="qp:layer").set_value(2).run()
    _ok(at)
    assert _qp(at, "layer") == ["2"]
    # a bad value in the URL falls back to the default instead of failing
    at = _page("stages.py", {"metric": "no_such_metric", "runs": ["nope"]})
    _ok(at)
    assert at.selectbox(key="qp:metric").value == "anisotropy_cosine"
    assert _qp(at, "metric") == ["anisotropy_cosine"]


def test_a_link_parameter_that_is_no_choice_is_said_not_ignored(observatory_db, app_env):
    """?layer=99 on a 3-layer model, an unknown metric, and a run id that does not exist each
    get one warning naming the parameter and what is shown instead."""
    app_env["use"](observatory_db["db"])
    at = _page("spectra.py", {"layer": "99", "heat_metric": "no_such_metric"})
    _ok(at)
    warnings = [w.value for w in at.warning]
    assert any("`layer=99`" in w and "showing 1 instead" in w for w in warnings), warnings
    assert any("`heat_metric=no_such_metric`" in w for w in warnings), warnings
    at = _page("stages.py", {"runs": ["run-obs-base", "run-nope"]})
    _ok(at)
    assert any("`runs=run-nope`" in w.value for w in at.warning)
    assert at.multiselect(key="qp:runs").value == ["run-obs-base"]
    at = _page("spectra.py", {"layer": "0"})  # a valid link: no warning
    assert not [w for w in at.warning if "link" in w.value]


def test_page_run_pickers_follow_the_sidebar_run(observatory_db, app_env):
    """Changing the sidebar's run moves the page's own run picker (it used to keep the run
    of its first render, so the sidebar picker did nothing there); a link still decides the
    first render."""
    app_env["use"](observatory_db["db"])
    for page, key, wrap in (("trajectories.py", "qp:traj_run", lambda r: r),
                            ("lora.py", "qp:lora_run", lambda r: r),
                            ("calibration.py", "qp:runs", lambda r: [r])):  # fmt: skip
        at = _page(page, {"run": "run-obs-base", "mode": "across stages"})
        _ok(at)
        picker = at.multiselect(key=key) if key == "qp:runs" else at.selectbox(key=key)
        assert picker.value == wrap("run-obs-base"), page
        at.sidebar.selectbox(key="qp:run").set_value("run-obs-replay").run()
        _ok(at)
        picker = at.multiselect(key=key) if key == "qp:runs" else at.selectbox(key=key)
        assert picker.value == wrap("run-obs-replay"), page
        # The page's other pickers (Calibration's checkpoints) lose their options with the
        # run; the stale value the page wrote into the URL itself is no bad link.
        assert not [w.value for w in at.warning if "link" in w.value], page


def test_stages_page_toggles(observatory_db, app_env):
    app_env["use"](observatory_db["db"])
    at = _page("stages.py")
    assert len(at.multiselect(key="qp:runs").value) == 2
    at.radio(key="qp:layout").set_value("overlaid").run()
    at.radio(key="qp:lines").set_value("chosen layer").run()
    at.multiselect(key="qp:layers").set_value([0, 2]).run()
    at.selectbox(key="qp:metric").set_value("effective_rank").run()
    _ok(at)
    assert len(at.get("plotly_chart")) == 2
    at.multiselect(key="qp:runs").set_value([]).run()
    _ok(at)
    assert "Pick at least one run" in at.info[0].value


def test_calibration_table_shows_each_score_with_its_interval(observatory_db, app_env):
    """Accuracy stored with n and a Wilson interval reads "v [lo, hi]"; ECE stored without
    one reads as its bare value (never an invented interval)."""
    app_env["use"](observatory_db["db"])
    at = _page("calibration.py")
    _ok(at)
    table = at.dataframe[0].value
    assert "n" in table and set(table["n"]) == {40}
    assert table["accuracy"].str.fullmatch(r"0\.\d{3} \[0\.\d{3}, 0\.\d{3}\]").all()
    assert not table["ece"].str.contains(r"\[").any()
    assert any("95 % interval" in c.value for c in at.caption)


def test_trajectories_cached_map_and_compute_button(observatory_db_copy, app_env):
    db = observatory_db_copy["db"]
    app_env["use"](db)
    at = _page("trajectories.py", {"method": "pca"})
    _ok(at)
    assert len(at.get("plotly_chart")) == 2, "paths map and per-stage panels"
    at.radio(key="qp:color").set_value("probe_set").run()
    _ok(at)
    at.radio(key="qp:mode").set_value("across layers").run()
    _ok(at)
    at.selectbox(key="qp:ckpt").set_value("run-obs-base/2")
    at.multiselect(key="qp:sets").set_value(["general", "math"]).run()
    _ok(at)
    assert len(at.get("plotly_chart")) == 2, "fixture caches the layer map of the last stage"
    # an uncached selection: the button queues one embedding job and shows its progress
    at.radio(key="qp:method").set_value("aligned_umap").run()
    assert not at.get("plotly_chart")
    at.button(key="compute_embedding").click().run()
    _ok(at)
    df = queue.list_jobs(Store(db))
    assert list(df["kind"]) == ["embedding"] and app_env["started"]
    spec = json.loads(df["spec_json"][0])
    assert spec["spec"]["mode"] == "layers" and spec["spec"]["method"] == "aligned_umap"
    assert at.get("progress")
    assert not at.button, "no second submit while the job is queued"


def test_weight_updates_page_names_the_method_of_every_stage(observatory_db_copy, app_env):
    db = observatory_db_copy["db"]
    Store(db).execute("UPDATE stages SET method = 'full' WHERE run_id = 'run-obs-replay' "
                      "AND stage_index > 0")  # fmt: skip
    app_env["use"](db)
    for run_id, word in (("run-obs-base", "LoRA"), ("run-obs-replay", "full fine-tuning")):
        at = _page("lora.py", {"lora_run": run_id})
        _ok(at)
        captions = " ".join(c.value for c in at.caption)
        assert f"Training method: 1:sft {word}, 2:math {word}." in captions, captions
        assert ("top-r singular directions" in captions) == (word != "LoRA")
        assert len(at.get("plotly_chart")) >= 3


def test_app_navigation_runs_every_page(observatory_db, app_env):
    app_env["use"](observatory_db["db"])
    at = AppTest.from_file(str(REPO_ROOT / "app.py"), default_timeout=TIMEOUT)
    at.run()
    _ok(at)
    assert at.title[0].value == "Collapse Observatory"
    assert at.sidebar.selectbox(key="qp:study").value == observatory_db["study_id"]
    at.run()  # AppTest gives entrypoint widgets new ids after the first run
    at.sidebar.selectbox(key="qp:run").set_value("run-obs-replay").run()
    assert at.sidebar.selectbox(key="qp:run").value == "run-obs-replay"
    for name in ("spectra.py", "lora.py", "overview.py"):
        at.switch_page(f"pages/{name}").run()
        _ok(at)
        assert at.sidebar.selectbox(key="qp:run").value == "run-obs-replay", name
    assert at.selectbox(key="qp:probe_set").value == "general"


def test_app_registers_every_existing_page(tmp_path):
    from collapse_core import ui

    pages = [p[0] for section in ui.existing_pages(REPO_ROOT).values() for p in section]
    assert pages[0] == "pages/overview.py", "Overview first"
    assert {f"pages/{name}" for name in PAGES} <= set(pages)
    (tmp_path / "pages").mkdir()
    (tmp_path / "pages" / "overview.py").write_text("")
    assert ui.existing_pages(tmp_path) == {"Browse": [ui.PAGE_SECTIONS["Browse"][0]]}


def test_browse_pages_do_not_import_torch(observatory_db, tmp_path):
    """App start and every browse page run without importing torch, transformers or umap."""
    code = f"""
import os, sys
os.environ["COLLAPSE_DB"] = {str(observatory_db["db"])!r}
os.environ["COLLAPSE_NO_AUTOPROBE"] = "1"
from streamlit.testing.v1 import AppTest
at = AppTest.from_file({str(REPO_ROOT / "app.py")!r}, default_timeout=60)
at.run()
for name in ("trajectories.py", "hypothesis.py", "spectra.py", "compare.py"):
    at.switch_page("pages/" + name).run()
    assert not at.exception, (name, at.exception)
heavy = sorted(m for m in ("torch", "transformers", "umap", "numba") if m in sys.modules)
print("HEAVY", heavy)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO_ROOT, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout, out.stdout


def test_deep_link_leaves_legacy_pages_mode(monkeypatch):
    """A deep link to a freshly started server is rerun through app.py (st.navigation)."""
    from streamlit.runtime.pages_manager import PagesManager

    from collapse_core import ui

    monkeypatch.setattr(PagesManager, "uses_pages_directory", True)
    assert ui._leave_legacy_pages_mode() is True
    assert PagesManager.uses_pages_directory is False
    assert ui._leave_legacy_pages_mode() is False
