"""Tracking a user's own run: series discovery, full-weight and adapter series, cache hits, watch
mode, the CLI, the "track" job kind and the CollapseCallback inside a real TRL SFTTrainer."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from collapse_core import cli, series, track
from collapse_core.errors import CollapseError
from collapse_core.models import load_model, peek_checkpoint_id
from collapse_core.probing import ProbeConfig
from collapse_core.store import Store
from tiny_models import make_tiny_model

CONFIG = ProbeConfig(max_length=24, n_samples=64, batch_size=16, max_prompts=12)
SETS = ("math",)


def _full_checkpoint(folder: Path, step_scale: float, seed: int = 0) -> Path:
    """A tiny llama saved at ``folder``, weights moved by ``step_scale`` of fixed noise."""
    model, tok = make_tiny_model("llama", seed=seed)
    gen = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(step_scale * 0.05 * torch.randn(p.shape, generator=gen))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _adapter_checkpoint(folder: Path, base: Path, step_scale: float) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(step_scale * 0.1 * torch.randn(p.shape, generator=gen))
    peft_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full_run")
    for step in (20, 5, 100):  # written out of order: discovery sorts by step, not by name
        _full_checkpoint(out / f"checkpoint-{step}", step / 100)
    (out / "checkpoint-7").mkdir()  # not a model folder: ignored
    (out / "runs").mkdir()
    return out


def _settings(**kw) -> track.TrackSettings:
    return track.TrackSettings(probe_sets=SETS, probe=CONFIG, device="cpu", **kw)


def test_discovery_sorts_checkpoints_numerically(full_run):
    entries = series.discover([full_run])
    assert [e.label for e in entries] == ["checkpoint-5", "checkpoint-20", "checkpoint-100"]
    assert [e.step for e in entries] == [5, 20, 100]


def test_toml_series_keeps_file_order_and_labels(full_run, tmp_path):
    toml = tmp_path / "series.toml"
    toml.write_text(
        f'late = "{full_run / "checkpoint-100"}"\nearly = "{full_run / "checkpoint-5"}"\n'
    )
    entries = series.discover([toml])
    assert [(e.label, e.step) for e in entries] == [("late", 100), ("early", 5)]
    toml.write_text('bad = "nowhere"\n')
    with pytest.raises(CollapseError, match="not a model folder"):
        series.discover([toml])


def test_discovery_refuses_what_is_no_series(tmp_path):
    with pytest.raises(CollapseError, match="does not exist"):
        series.discover([tmp_path / "missing"])
    with pytest.raises(CollapseError, match="checkpoint-<step>"):
        series.discover([tmp_path])


def test_peek_checkpoint_id_equals_loaded_id(full_run, tmp_path):
    folder = full_run / "checkpoint-5"
    assert peek_checkpoint_id(folder) == load_model(folder, device="cpu").checkpoint_id
    adapter = _adapter_checkpoint(tmp_path / "adapter", folder, 1.0)
    loaded = load_model(adapter, base=folder, device="cpu")
    assert peek_checkpoint_id(adapter, folder) == loaded.checkpoint_id
    assert peek_checkpoint_id(adapter) is None  # an adapter has no id without its base


def test_full_weight_series_with_evals_and_cache_hit(full_run, tmp_path):
    store = Store(tmp_path / "t.duckdb")
    settings = _settings(evaluate=True, data_source="sample",
                         eval_settings={"n_heldout": 2, "n_ood": 4, "plasticity_steps": 1,
                                        "plasticity_n": 4})  # fmt: skip
    entries = track.series_entries([full_run], None)
    first = track.track(entries, "my run", store, settings)
    assert [s.cached for s in first] == [False, False, False]
    study_id, run_id = track.series_ids("my run")
    stages = store.query("SELECT * FROM stages WHERE run_id = ? ORDER BY stage_index", [run_id])
    assert list(stages["stage"]) == ["checkpoint-5", "checkpoint-20", "checkpoint-100"]
    assert list(stages["steps"]) == [5, 20, 100]
    assert track_methods(store, run_id) == [None] * 3  # how a user trained them is not known
    assert store.query("SELECT method FROM runs WHERE run_id = ?", [run_id])["method"].isna().all()
    names = store.query("SELECT name FROM checkpoints WHERE run_id = ?", [run_id])["name"]
    assert set(names) == {"checkpoint-5", "checkpoint-20", "checkpoint-100"}
    evals = store.query("SELECT DISTINCT stage, eval FROM evals WHERE run_id = ?", [run_id])
    assert {"ood", "plasticity"} <= set(evals["eval"])
    lora = store.query("SELECT * FROM lora_metrics WHERE run_id = ?", [run_id])
    assert set(lora["stage"]) == {"1:checkpoint-20", "2:checkpoint-100"}
    one = lora[lora["stage"] == "1:checkpoint-20"].set_index(["module", "metric"])["value"]
    module = "model.layers.0.self_attn.q_proj"
    # at stage 1 the step update W1 - W0 is the cumulative update
    assert one[(module, "effective_rank")] == pytest.approx(
        one[(module, "cumulative_effective_rank")]
    )
    two = lora[lora["stage"] == "2:checkpoint-100"]
    angles = two[two["metric"] == "principal_angle_mean"]
    assert set(angles["other_stage"]) == {"1:checkpoint-20"}
    assert (two["metric"] == "intruder_dimensions_cumulative").any()
    before = store.table_hashes()
    again = track.track(track.series_entries([full_run], None), "my run", store, settings)
    assert all(s.cached for s in again)
    assert [s.probe_keys for s in again] == [s.probe_keys for s in first]
    after = store.table_hashes()
    assert {k: v for k, v in after.items() if k != "runs"} == {
        k: v for k, v in before.items() if k != "runs"
    }  # nothing rewritten (runs only gets its finished_at)
    # the views see it as a study with one run whose stages are the checkpoints
    from collapse_core import views

    cat = views.stage_catalog(store, study_id=study_id)
    assert list(cat["stage_label"]) == ["0:checkpoint-5", "1:checkpoint-20", "2:checkpoint-100"]


def test_adapter_series_on_base(tmp_path):
    base = _full_checkpoint(tmp_path / "base", 0.0)
    run = tmp_path / "lora_run"
    for step, scale in ((10, 0.5), (20, 1.0)):
        _adapter_checkpoint(run / f"checkpoint-{step}", base, scale)
    store = Store(tmp_path / "a.duckdb")
    settings = _settings(base=str(base), evaluate=True, data_source="sample",
                         eval_settings={"n_heldout": 0, "n_ood": 2, "plasticity_steps": 0})  # fmt: skip
    stages = track.track(track.series_entries([run], str(base)), "lora", store, settings)
    assert [s.label for s in stages] == ["base", "checkpoint-10", "checkpoint-20"]
    _, run_id = track.series_ids("lora")
    lora = store.query("SELECT DISTINCT module FROM lora_metrics WHERE run_id = ?", [run_id])
    # only the adapted modules changed
    assert set(lora["module"]) == {f"model.layers.{i}.self_attn.{m}" for i in range(2)
                                   for m in ("q_proj", "v_proj")}  # fmt: skip
    adapters = store.query("SELECT adapter_path FROM stages WHERE run_id = ? ORDER BY stage_index",
                           [run_id])["adapter_path"]  # fmt: skip
    assert adapters.isna().iloc[0] and str(adapters.iloc[2]).endswith("checkpoint-20")
    assert track_methods(store, run_id) == [None, "lora", "lora"]  # a tracked adapter is LoRA


def test_changed_series_is_rewritten_from_the_first_difference(full_run, tmp_path):
    store = Store(tmp_path / "c.duckdb")
    entries = track.series_entries([full_run], None)
    track.track(entries[:2], "grow", store, _settings())
    swapped = [entries[0], entries[2]]
    out = track.track(swapped, "grow", store, _settings())
    assert [s.cached for s in out] == [True, False]
    _, run_id = track.series_ids("grow")
    stages = store.query("SELECT stage FROM stages WHERE run_id = ? ORDER BY stage_index", [run_id])
    assert list(stages["stage"]) == ["checkpoint-5", "checkpoint-100"]
    # Other settings: every stage is redone under them and the series records them (its
    # config_json held the first track's settings, and the log blamed "stage 0").
    lines: list[str] = []
    other = track.TrackSettings(probe_sets=("code",), probe=CONFIG, device="cpu")
    assert track.settings_change(store, "grow", other.describe()) == (
        f"probe_sets {list(SETS)!r} -> ['code']"
    )
    out = track.track(swapped, "grow", store, other, log=lines.append)
    assert [s.cached for s in out] == [False, False]
    assert any("settings changed: probe_sets" in line for line in lines), lines
    for table, key in (("runs", "run_id"), ("studies", "study_id")):
        stored = store.query(f"SELECT config_json FROM {table} WHERE {key} = ?",
                             [run_id if table == "runs" else track.series_ids("grow")[0]])  # fmt: skip
        assert json.loads(stored["config_json"][0])["track"]["probe_sets"] == ["code"]
    assert track.settings_change(store, "grow", other.describe()) is None
    assert all(s.cached for s in track.track(swapped, "grow", store, other))


def test_watch_picks_up_a_new_checkpoint(tmp_path):
    run = tmp_path / "growing"
    _full_checkpoint(run / "checkpoint-1", 0.1)
    store = Store(tmp_path / "w.duckdb")
    lines: list[str] = []

    def writer() -> None:  # the user's training writes the next checkpoint after the first poll
        while not any("poll 1" in line for line in lines):
            time.sleep(0.05)
        _full_checkpoint(run / "checkpoint-2", 0.2)

    thread = threading.Thread(target=writer)
    thread.start()
    stages = track.watch([run], "watched", store, _settings(), poll_seconds=0.1, max_polls=2,
                         log=lines.append)  # fmt: skip
    thread.join(timeout=30)
    assert [s.label for s in stages] == ["checkpoint-1", "checkpoint-2"]
    assert any("poll 2: 1 new checkpoint" in line for line in lines), lines


def test_cli_track_and_one_line_errors(full_run, tmp_path, capsys):
    db = tmp_path / "cli.duckdb"
    args = ["track", str(full_run / "checkpoint-5"), str(full_run / "checkpoint-20"), "--name",
            "cli run", "--db", str(db), "--probe-set", "math", "--max-length", "24",
            "--n-samples", "64", "--max-prompts", "12", "--device", "cpu"]  # fmt: skip
    assert cli.main(args) == 0
    assert cli.main(args) == 0
    assert "2 cache hits" in capsys.readouterr().out
    assert cli.main(["track", str(tmp_path / "nope"), "--name", "x", "--db", str(db)]) == 2
    assert "does not exist" in capsys.readouterr().err


def _wide_checkpoint(folder: Path) -> Path:
    """A tiny llama like :func:`_full_checkpoint`'s but with hidden size 48: another model."""
    from transformers import LlamaForCausalLM

    model, tok = make_tiny_model("llama", seed=0)
    config = model.config
    config.hidden_size = 48
    LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_series_of_another_models_checkpoints_is_refused_before_anything_runs(full_run, tmp_path,
                                                                              capsys):  # fmt: skip
    wide = _wide_checkpoint(tmp_path / "wide")
    hostile = tmp_path / "hostile"  # a config nested past Python's recursion limit: no shape
    hostile.mkdir()
    (hostile / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert series.model_shape(hostile) is None and series.model_shape(wide)["hidden size"] == 48
    with pytest.raises(
        CollapseError,
        match="checkpoint checkpoint-5 has hidden size 32 but base "
        "has 48; a series tracks checkpoints of one model",
    ):
        track.series_entries([full_run], str(wide))
    # A LoRA adapter on the wrong base: the message carries torch's size-mismatch line.
    adapter = _adapter_checkpoint(tmp_path / "adapter", full_run / "checkpoint-5", 1.0)
    with pytest.raises(CollapseError, match=r"does not fit base .*size mismatch for .*lora_A"):
        load_model(adapter, base=wide, device="cpu")
    # A mistyped probe set: one line before the series is registered or any model loads.
    db = tmp_path / "typo.duckdb"
    assert cli.main(["track", str(full_run), "--name", "typo", "--db", str(db), "--probe-set",
                     "maths", "--device", "cpu"]) == 2  # fmt: skip
    assert "unknown probe set 'maths'" in capsys.readouterr().err
    assert not db.exists()


def test_track_job_kind(full_run, tmp_path):
    from collapse_core.jobs import queue
    from collapse_core.jobs.handlers import HANDLERS
    from collapse_core.jobs.worker import run_worker

    assert "track" in HANDLERS
    store = Store(tmp_path / "j.duckdb")
    spec = {"name": "job run", "probe_sets": list(SETS), "device": "cpu",
            "config": {"max_length": 24, "n_samples": 64, "max_prompts": 12},
            "entries": [{"label": "first", "path": str(full_run / "checkpoint-5"), "step": 5},
                        {"label": "second", "path": str(full_run / "checkpoint-20")}]}  # fmt: skip
    job_id = queue.submit(store, "track", spec)
    run_worker(store, exit_when_idle=0.1)
    job = queue.get_job(store, job_id)
    assert job["status"] == "done", job
    _, run_id = track.series_ids("job run")
    stages = store.query("SELECT stage FROM stages WHERE run_id = ? ORDER BY stage_index", [run_id])
    assert list(stages["stage"]) == ["first", "second"]


def test_allowed_folder_roots(tmp_path, monkeypatch):
    monkeypatch.delenv(series.ROOTS_ENV, raising=False)
    with pytest.raises(CollapseError, match="off"):
        series.check_allowed_folder(tmp_path)
    monkeypatch.setenv(series.ROOTS_ENV, str(tmp_path / "runs"))
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert series.check_allowed_folder(tmp_path / "runs" / "a") == (tmp_path / "runs" / "a")
    with pytest.raises(CollapseError, match="outside"):
        series.check_allowed_folder(tmp_path / "runs" / ".." / "elsewhere")


def test_callback_in_sft_trainer_matches_track(tmp_path):
    """A real TRL SFTTrainer on the tiny model: the callback probes in memory on every save (and
    every 3 steps); tracking the saved folders afterwards gives the identical probe keys."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from collapse_core.integrations import CollapseCallback

    base = _full_checkpoint(tmp_path / "base", 0.0)
    model = load_model(base, device="cpu").model
    model.train()
    tok = load_model(base, device="cpu").tokenizer
    texts = [f"question {i}: what is {i} plus {i}? answer: {2 * i}" for i in range(32)]
    data = Dataset.from_dict({"text": texts})
    store = Store(tmp_path / "cb.duckdb")
    callback = CollapseCallback("sft run", store=store, every_n_steps=3, probe_sets=SETS,
                                probe_config=CONFIG, base=str(base))  # fmt: skip
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=4, save_steps=2,
                     per_device_train_batch_size=4, learning_rate=1e-2, logging_steps=1,
                     report_to=[], use_cpu=True, max_length=32, save_only_model=True,
                     dataloader_num_workers=0, disable_tqdm=True)  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                         callbacks=[callback])  # fmt: skip
    trainer.train()
    assert callback.labels == ["base", "checkpoint-2", "step-3", "checkpoint-4"]
    report = callback.report()
    assert report["probe_seconds"] > 0 and 0 < report["probe_share"] < 1
    _, run_id = track.series_ids("sft run")
    stages = store.query("SELECT stage, steps, train_loss_last FROM stages WHERE run_id = ? "
                         "ORDER BY stage_index", [run_id])  # fmt: skip
    assert list(stages["steps"]) == [0, 2, 3, 4]
    assert stages["train_loss_last"].iloc[1:].notna().all()
    tracked = track.track(track.series_entries([tmp_path / "out"], str(base)), "sft run (track)",
                          store, _settings(base=str(base)))  # fmt: skip
    by_label = {s.label: s for s in tracked}
    for label in ("base", "checkpoint-2", "checkpoint-4"):
        assert by_label[label].probe_keys == callback.probe_keys[label]
        assert by_label[label].cached, label  # identical key: no forward pass at all


# -- the Probe a model page: a series queued as one "track" job ------------------------------
def _zip_of(folder: Path) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in folder.iterdir():
            if p.is_file() and not p.name.startswith("."):
                zf.write(p, f"{folder.name}/{p.name}")
    return buf.getvalue()


def _probe_page(app_env, tmp_path):
    import json

    from streamlit.testing.v1 import AppTest

    from collapse_core.jobs import queue
    from collapse_core.paths import REPO_ROOT

    db = tmp_path / "page.duckdb"
    app_env["use"](db)
    at = AppTest.from_file(str(REPO_ROOT / "pages" / "probe_model.py"), default_timeout=60)
    at.run()
    assert not at.exception

    def jobs() -> list[dict]:
        df = queue.list_jobs(Store(db))
        return [{"kind": k, **json.loads(s)} for k, s in zip(df["kind"], df["spec_json"],
                                                              strict=True)]  # fmt: skip

    return at, jobs


def test_probe_page_series_upload_is_one_job_named_by_files(full_run, app_env, tmp_path):
    at, jobs = _probe_page(app_env, tmp_path)
    files = [(f"checkpoint-{s}.zip", _zip_of(full_run / f"checkpoint-{s}"), "application/zip")
             for s in (20, 5)]  # fmt: skip
    at.file_uploader(key="series_files").set_value(files)
    at.text_input(key="series_name").set_value("uploaded run")
    at.button(key="series_submit").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "2 checkpoints" in at.success[0].value
    (job,) = jobs()
    assert job["kind"] == "track" and job["name"] == "uploaded run"
    assert [(e["label"], e["step"]) for e in job["entries"]] == [("checkpoint-5", 5),
                                                                 ("checkpoint-20", 20)]  # fmt: skip
    assert app_env["started"] == ["w"]


def test_probe_page_series_folder_needs_an_allowed_root(full_run, app_env, tmp_path, monkeypatch):
    at, jobs = _probe_page(app_env, tmp_path)
    at.radio(key="series_source").set_value("Server folder").run()
    at.text_input(key="series_folder").set_value(str(full_run))
    at.text_input(key="series_name").set_value("folder run")
    monkeypatch.delenv(series.ROOTS_ENV, raising=False)
    at.button(key="series_submit").click().run()
    assert len(at.error) == 1 and series.ROOTS_ENV in at.error[0].value and not jobs()
    monkeypatch.setenv(series.ROOTS_ENV, str(tmp_path / "elsewhere"))
    at.button(key="series_submit").click().run()
    assert "outside the allowed folders" in at.error[0].value and not jobs()
    monkeypatch.setenv(series.ROOTS_ENV, str(full_run.parent))
    at.button(key="series_submit").click().run()
    assert not at.error, [e.value for e in at.error]
    (job,) = jobs()
    assert job["kind"] == "track" and job["paths"] == [str(full_run.resolve())]


def track_methods(store: Store, run_id: str) -> list[str | None]:
    methods = store.query("SELECT method FROM stages WHERE run_id = ? ORDER BY stage_index",
                          [run_id])["method"]  # fmt: skip
    return [None if m is None or m != m else m for m in methods]
