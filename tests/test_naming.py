"""One naming rule for checkpoints (CLI path, zip, loose files), a name typed on upload, rename,
and a run starting from a standalone checkpoint leaves it standalone, with probe settings shown.
"""

from __future__ import annotations

import io
import os
import zipfile
from pathlib import Path

import pytest

from collapse_core import naming, views
from collapse_core.errors import CollapseError
from collapse_core.jobs import queue, worker
from collapse_core.models import load_model
from collapse_core.store import Store
from collapse_core.uploads import prepare_upload, save_upload
from tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("naming_src") / "tiny-llama"
    make_tiny_model("llama", path=path, seed=0)
    return path


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory) -> Path:
    """A real LoRA adapter folder ``my-adapter`` for the tiny model."""
    from peft import LoraConfig, get_peft_model

    model, _ = make_tiny_model("llama", seed=0)
    peft = get_peft_model(
        model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    )
    path = tmp_path_factory.mktemp("naming_adapter") / "my-adapter"
    peft.save_pretrained(path)
    (path / "README.md").write_text("# my adapter\n")  # PEFT writes one too; keep it explicit
    return path


@pytest.fixture
def data(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "data"
    monkeypatch.setenv("COLLAPSE_DATA", str(root))
    return root


def _zip(folder: Path, name: str, prefix: str = "") -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, prefix + p.name)
    return save_upload(name, buf.getvalue())


def test_rule_skips_generated_folders():
    assert naming.model_name("/d/uploads/0123456789abcdef0123456789abcdef/extracted") == (
        "uploaded model"
    )
    assert naming.model_name("/d/uploads/0123456789abcdef0123456789abcdef/my-adapter") == (
        "my-adapter"
    )
    assert naming.model_name("/models/tiny-llama/") == "tiny-llama"
    assert naming.adapter_name("smollm2", "/x/my-adapter") == "smollm2+my-adapter"


def test_same_adapter_same_name_by_path_zip_or_loose_files(data, tiny, adapter):
    by_path = load_model(adapter, base=tiny, device="cpu", verbose=False)
    assert by_path.name == "tiny-llama+my-adapter"
    flat_zip = prepare_upload([_zip(adapter, "my-adapter.zip")])  # files at the zip's root
    nested_zip = prepare_upload([_zip(adapter, "upload.zip", prefix="my-adapter/")])
    # loose PEFT files with a README are accepted like the zip route (the README is left out)
    loose = prepare_upload([save_upload(p.name, p.read_bytes()) for p in adapter.iterdir()])
    assert not (loose / "README.md").exists()
    names = {load_model(p, base=tiny, device="cpu", verbose=False).name
             for p in (flat_zip, nested_zip)}  # fmt: skip
    assert names == {"tiny-llama+my-adapter"}
    assert "extracted" not in load_model(loose, base=tiny, device="cpu", verbose=False).name


def test_name_typed_on_upload_and_rename(data, tiny, tmp_path):
    store = Store(tmp_path / "n.duckdb")
    spec = {"model": str(tiny), "probe_sets": ["general"], "device": "cpu", "name": "My model",
            "config": {"max_prompts": 4, "max_length": 16, "n_samples": 16}}  # fmt: skip
    queue.submit(store, "probe", spec)
    assert worker.run_job(store, worker.claim_next(store)) == queue.DONE
    (ckpt,) = store.query("SELECT checkpoint_id, name FROM checkpoints").itertuples(index=False)
    assert ckpt.name == "My model"
    # the same weights uploaded again under another name: the typed name wins again
    queue.submit(store, "probe", {**spec, "name": "Renamed on upload"})
    assert worker.run_job(store, worker.claim_next(store)) == queue.DONE
    assert store.query("SELECT name FROM checkpoints")["name"][0] == "Renamed on upload"
    assert naming.rename_checkpoint(store, ckpt.checkpoint_id, "  final   name ") == "final name"
    assert views.standalone_checkpoints(store)["name"][0] == "final name"
    with pytest.raises(CollapseError, match="empty"):
        naming.rename_checkpoint(store, ckpt.checkpoint_id, "   ")
    # the Overview's rename box does the same
    from streamlit.testing.v1 import AppTest

    from collapse_core.paths import REPO_ROOT

    os.environ["COLLAPSE_DB"], os.environ["COLLAPSE_NO_AUTOPROBE"] = str(store.path), "1"
    try:
        at = AppTest.from_file(str(REPO_ROOT / "pages" / "overview.py"), default_timeout=60)
        at.run()
        at.text_input(key="rename_name").set_value("from the page")
        at.button(key="rename_go").click().run()
        assert not at.exception and not at.error
    finally:
        os.environ.pop("COLLAPSE_DB")
        os.environ.pop("COLLAPSE_NO_AUTOPROBE")
    assert store.query("SELECT name FROM checkpoints")["name"][0] == "from the page"
    with pytest.raises(CollapseError, match="no checkpoint"):
        naming.rename_checkpoint(store, "nope", "x")


def test_run_from_a_standalone_checkpoint_keeps_it_standalone(data, tiny, tmp_path):
    from collapse_core.pipeline import run_study
    from collapse_core.probing import ProbeConfig, probe
    from collapse_core.runconfig import parse_config

    store = Store(tmp_path / "s.duckdb")
    loaded = load_model(tiny, device="cpu", verbose=False)
    probe(loaded, "general", ProbeConfig(max_length=16, n_samples=32), store=store)
    config = parse_config({
        "run": {"name": "from-standalone", "model": str(tiny), "stages": ["sft"],
                "data_source": "sample", "device": "cpu"},
        "train": {"steps": 1, "batch_size": 2, "n_train": 4, "max_length": 32},
        "eval": {"n_heldout": 1, "n_ood": 0, "plasticity_steps": 0, "probe_sets": ["general"],
                 "probe_max_prompts": 8, "queue_embeddings": False},
        "probe": {"max_length": 32, "n_samples": 64},
    })  # fmt: skip
    run_study(config, store)
    standalone = views.standalone_checkpoints(store)
    assert list(standalone["checkpoint_id"]) == [loaded.checkpoint_id]  # still outside any run
    table = views.standalone_table(store)
    # the numbers say which probe settings they come from (the run's probe is the newest)
    assert table["settings"][0].startswith("general: 8 prompts · ≤32 tokens each · 64 sampled")
    probes = views.latest_probes(store, [loaded.checkpoint_id])
    assert set(probes["settings"]) == {"8 prompts · ≤32 tokens each · 64 sampled tokens · seed 0"}
    # the user picks the standalone probe's settings: its own numbers come back
    choices = views.probe_settings_choices(store, [loaded.checkpoint_id])
    assert len(choices) == 2
    own = next(c for c, label in choices.items() if label.startswith("all prompts · ≤16 tokens"))
    picked = views.standalone_table(store, prefer_config=own)
    assert picked["settings"][0].startswith("general: all prompts · ≤16 tokens each · 32 sampled")
    assert picked["erank_mid"][0] != table["erank_mid"][0]
