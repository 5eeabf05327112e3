"""AppTest runs of the operations pages: Probe a model, Runs & jobs, Export a report.

No worker is started from these tests (``worker.ensure_worker`` is replaced by a recorder); the
queue itself is tested with real workers in ``test_jobs.py``.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest
from study_db import cached_study_db

from collapse_core.jobs import queue, worker
from collapse_core.paths import REPO_ROOT
from collapse_core.store import Store
from tiny_models import make_tiny_model

PAGES = REPO_ROOT / "pages"
TIMEOUT = 60


@pytest.fixture(scope="module")
def tiny_zip(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("page_tiny") / "tiny"
    make_tiny_model("gpt2", path=folder, seed=0)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in folder.iterdir():
            zf.write(p, f"tiny/{p.name}")
    return buf.getvalue()


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A temp data dir + DB, no autoprobe, not read-only, and no worker processes."""
    data = tmp_path / "data"
    monkeypatch.setenv("COLLAPSE_DATA", str(data))
    monkeypatch.setenv("COLLAPSE_DB", str(tmp_path / "app.duckdb"))
    monkeypatch.setenv("COLLAPSE_NO_AUTOPROBE", "1")
    monkeypatch.delenv("COLLAPSE_READONLY", raising=False)
    started: list[str] = []
    monkeypatch.setattr(worker, "ensure_worker", lambda store, *a, **k: started.append("w") or True)
    return {"data": data, "db": tmp_path / "app.duckdb", "started": started}


def _app(name: str) -> AppTest:
    at = AppTest.from_file(str(PAGES / name), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def _jobs(db: Path):
    return queue.list_jobs(Store(db))


# -- Probe a model -------------------------------------------------------------------------
def test_probe_page_upload_good_zip_submits_job(env, tiny_zip):
    at = _app("probe_model.py")
    at.file_uploader(key="probe_files").set_value(("tiny.zip", tiny_zip, "application/zip"))
    at.multiselect(key="probe_sets").set_value(["general", "math"])
    at.button(key="probe_submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Queued probe job" in at.success[0].value
    df = _jobs(env["db"])
    assert list(df["kind"]) == ["probe"] and env["started"] == ["w"]
    spec = json.loads(df["spec_json"][0])
    assert Path(spec["model"]).is_relative_to(env["data"] / "uploads")
    assert (Path(spec["model"]) / "config.json").is_file()
    assert spec["probe_sets"] == ["general", "math"] and spec["base"] is None
    # a second click reuses the prepared upload instead of saving the files again
    at.button(key="probe_submit").click().run()
    second = json.loads(_jobs(env["db"])["spec_json"][0])
    assert second["model"] == spec["model"] and len(_jobs(env["db"])) == 2
    assert len(list((env["data"] / "uploads").iterdir())) == 1


def test_probe_page_bad_upload_is_one_line_error_and_changes_nothing(env, tiny_zip):
    at = _app("probe_model.py")
    before = Store(env["db"]).table_hashes()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../../evil.json", "{}")
    at.file_uploader(key="probe_files").set_value(("evil.zip", buf.getvalue(), "application/zip"))
    at.button(key="probe_submit").click().run()
    assert not at.exception
    assert len(at.error) == 1 and "escapes its folder" in at.error[0].value
    assert "\n" not in at.error[0].value and "Traceback" not in at.error[0].value
    assert _jobs(env["db"]).empty and env["started"] == []
    assert Store(env["db"]).table_hashes() == before
    assert not [p for p in (env["data"] / "uploads").rglob("*") if p.is_file()]
    assert not list(env["data"].parent.glob("evil*"))
    # a lone .bin is refused the same way
    at.file_uploader(key="probe_files").set_value(("model.bin", b"\x80\x04x", "x/y"))
    at.button(key="probe_submit").click().run()
    assert "pickled weights are not accepted" in at.error[0].value


def test_probe_page_refuses_cuda_without_a_gpu_and_only_warns_about_an_unused_base(env, tmp_path):
    import torch

    at = _app("probe_model.py")
    at.radio(key="probe_source").set_value("Local path").run()
    at.text_input(key="probe_base").set_value("definitely-not-a-model").run()
    # the base applies only to an adapter: a warning under the field, not an error box
    assert not at.error and any("matters only if the model is a LoRA adapter" in c.value
                                for c in at.caption)  # fmt: skip
    if torch.cuda.is_available():
        return  # the refusal below needs a machine without a GPU
    at.radio(key="probe_source").set_value("Bundled SmolLM2").run()
    at.selectbox(key="probe_device").set_value("cuda").run()
    at.button(key="probe_submit").click().run()
    assert len(at.error) == 1 and "no GPU is visible" in at.error[0].value
    assert _jobs(env["db"]).empty and env["started"] == []


def test_probe_page_local_path_and_builtin(env, tmp_path):
    at = _app("probe_model.py")
    at.radio(key="probe_source").set_value("Local path").run()
    at.text_input(key="probe_path").set_value(str(tmp_path / "missing")).run()
    at.button(key="probe_submit").click().run()
    assert "does not exist" in at.error[0].value and _jobs(env["db"]).empty
    model = tmp_path / "local-model"
    make_tiny_model("llama", path=model)
    at.text_input(key="probe_path").set_value(str(model)).run()
    at.button(key="probe_submit").click().run()
    assert not at.error and "Queued probe job" in at.success[0].value
    assert json.loads(_jobs(env["db"])["spec_json"][0])["model"] == str(model)
    at.radio(key="probe_source").set_value("Bundled SmolLM2").run()
    at.button(key="probe_submit").click().run()
    spec = json.loads(_jobs(env["db"])["spec_json"][0])
    assert spec["model"] == "smollm2" and spec["config"]["lens_samples"] == 64
    at.number_input(key="probe_lens_samples").set_value(0).run()  # a probe without the lens
    at.button(key="probe_submit").click().run()
    assert json.loads(_jobs(env["db"])["spec_json"][0])["config"]["lens_samples"] == 0
    # The inputs' limits and defaults are the ones the CLI and ProbeConfig check.
    from collapse_core.probe_settings import PROBE_DEFAULTS, PROBE_LIMITS

    for key, name in (("probe_max_length", "max_length"), ("probe_batch", "batch_size"),
                      ("probe_samples", "n_samples"), ("probe_lens_samples", "lens_samples")):  # fmt: skip
        box = at.number_input(key=key)
        assert (box.min, box.max) == (PROBE_LIMITS[name].lo, PROBE_LIMITS[name].hi), key
        assert box.value == (0 if name == "lens_samples" else PROBE_DEFAULTS[name]), key


def test_probe_page_base_model_is_the_one_validated_control(env, tmp_path):
    """Issue 16: the LoRA base is one field with the Runs form's check (no selectbox + "path
    (if other)" pair whose text was ignored unless the selectbox was switched too)."""
    from peft import LoraConfig, get_peft_model

    base = tmp_path / "my-base"
    make_tiny_model("llama", path=base, seed=0)
    model, _ = make_tiny_model("llama", seed=0)
    adapter = tmp_path / "my-adapter"
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    at = _app("probe_model.py")
    assert not [s for s in at.selectbox if "Base model" in s.label]
    at.radio(key="probe_source").set_value("Local path").run()
    at.text_input(key="probe_path").set_value(str(adapter)).run()
    at.text_input(key="probe_base").set_value(str(tmp_path / "nope")).run()
    assert "does not exist" in at.error[0].value  # said as typed, before Probe
    at.button(key="probe_submit").click().run()
    assert _jobs(env["db"]).empty
    at.text_input(key="probe_base").set_value(str(adapter)).run()
    assert "is a LoRA adapter; a base model must be a full model" in at.error[0].value
    at.text_input(key="probe_base").set_value(str(base)).run()
    assert not at.error
    at.button(key="probe_submit").click().run()
    assert not at.error and "Queued probe job" in at.success[0].value
    spec = json.loads(_jobs(env["db"])["spec_json"][0])
    assert (spec["model"], spec["base"]) == (str(adapter), str(base))


def test_probe_page_read_only(env, monkeypatch):
    monkeypatch.setenv("COLLAPSE_READONLY", "1")
    at = _app("probe_model.py")
    assert at.info and "read-only" in at.info[0].value
    assert not at.button and not at.file_uploader


# -- Runs & jobs ---------------------------------------------------------------------------
def test_runs_page_form_submits_pipeline_and_cancel(env):
    at = _app("runs.py")
    assert any("No jobs yet" in c.value for c in at.caption)
    form_stages = at.multiselect[0]
    form_stages.set_value(["sft", "math"])
    at.number_input[0].set_value(3)  # steps
    at.checkbox[0].check()  # replay
    at.button(key="start_run").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    df = _jobs(env["db"])
    assert list(df["kind"]) == ["pipeline"] and list(df["status"]) == ["queued"]
    config = json.loads(df["spec_json"][0])["config_dict"]
    assert config["run"]["stages"] == ["sft", "math"] and config["train"]["steps"] == 3
    assert config["interventions"]["arms"] == ["baseline", "replay"]
    job_id = df["job_id"][0]
    at.run()
    assert any(p.value == 0.0 for p in at.get("progress"))
    at.button(key=f"cancel-{job_id}").click().run()
    assert not at.exception
    assert _jobs(env["db"])["status"][0] == "cancelled"


def test_runs_page_bad_form_and_shipped_config(env):
    at = _app("runs.py")
    at.multiselect[0].set_value([])
    at.button(key="start_run").click().run()
    assert "pick at least one stage" in at.error[0].value and _jobs(env["db"]).empty
    at.multiselect[0].set_value(["sft"])
    at.text_input(key="run_model").set_value("/definitely/not/here")
    at.button(key="start_run").click().run()
    assert "does not exist" in at.error[0].value and _jobs(env["db"]).empty
    at.button(key="start_config").click().run()
    assert not at.exception
    spec = json.loads(_jobs(env["db"])["spec_json"][0])
    assert Path(spec["config"]).parent == REPO_ROOT / "configs"


def test_runs_page_read_only_shows_jobs_without_controls(env, monkeypatch):
    store = Store(env["db"])
    queue.submit(store, "probe", {"model": "smollm2", "probe_sets": ["general"]})
    failed = queue.submit(store, "probe", {"model": "x", "probe_sets": ["general"]})
    store.execute(
        "UPDATE jobs SET status = 'failed', error = 'model not found' WHERE job_id = ?", [failed]
    )
    monkeypatch.setenv("COLLAPSE_READONLY", "1")
    at = _app("runs.py")
    assert "Read-only" in at.info[0].value
    assert not at.form_submit_button and not [b for b in at.button if "cancel" in str(b.key)]
    assert "model not found" in at.error[0].value
    assert len(at.get("progress")) == 1


# -- Export a report -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def study_db():
    return cached_study_db()


def test_report_page_builds_downloads(env, study_db, monkeypatch, tmp_path):
    db = tmp_path / "copy.duckdb"
    shutil.copy(study_db["db"], db)
    monkeypatch.setenv("COLLAPSE_DB", str(db))
    at = _app("report.py")
    options = at.selectbox(key="report_scope").options
    assert any(study_db["study_id"] in o for o in options) and "standalone" in options[0]
    at.selectbox(key="report_scope").set_value(study_db["study_id"]).run()
    at.button(key="build_report").click().run()
    assert not at.exception and not at.error
    assert at.get("download_button"), "no download button after building the report"
    at.radio(key="report_fmt").set_value("parquet").run()
    at.button(key="build_tables").click().run()
    assert not at.exception and len(at.get("download_button")) == 2


def test_report_page_empty_db(env):
    at = _app("report.py")
    at.button(key="build_report").click().run()
    assert not at.exception and at.get("download_button")
