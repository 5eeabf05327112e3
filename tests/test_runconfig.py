"""Run configs: every section a typed dataclass; bad keys, types and values → one line, before
anything is written (issue 13, class 4)."""

from __future__ import annotations

import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest

from collapse_core.errors import CollapseError
from collapse_core.interventions import build_interventions
from collapse_core.interventions.refresh import RefreshSettings
from collapse_core.interventions.replay import Replay, ReplaySettings
from collapse_core.probing import ProbeConfig, ProbeSection
from collapse_core.runconfig import EvalSection, load_config, parse_config
from collapse_core.sections import Range, from_table
from collapse_core.store import Store
from collapse_core.train import TrainConfig
from collapse_core.train.loop import TrainSection

REPO = Path(__file__).resolve().parents[1]
BASE = {"run": {"name": "x", "model": "smollm2", "stages": ["sft"]}}


def _with(section: str, **values) -> dict:
    if section == "run":
        return {"run": {**BASE["run"], **values}}
    return {**BASE, section: values}


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_still_parse(path):
    config = load_config(path)
    assert isinstance(config.train, TrainSection) and isinstance(config.train, TrainConfig)
    assert isinstance(config.probe, ProbeSection) and isinstance(config.probe, ProbeConfig)
    assert isinstance(config.eval, EvalSection)
    assert config.keep_all is False and config.eval.heldout_domains in ("all", "order")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (_with("eval", n_sample=5), "unknown key [eval] n_sample; did you mean [probe] n_samples?"),
        (_with("probe", n_sample=5), "unknown key [probe] n_sample; did you mean n_samples?"),
        (_with("interventions", replay={"fracton": 0.2}),
         "unknown key [interventions.replay] fracton; did you mean fraction?"),
        (_with("train", stpes=3), "did you mean steps?"),
        (_with("run", stage=["sft"]), "did you mean stages?"),
        ({**BASE, "evals": {}}, "unknown section [evals]; did you mean eval?"),
        (_with("interventions", replya={}), "[interventions.replya]; did you mean replay?"),
        (_with("run", stages=["sft", "mth"]), "unknown stage 'mth'; did you mean math?"),
        (_with("interventions", arms=["baseline", "olor"]), "'olor'; did you mean olora?"),
    ],
)  # fmt: skip
def test_unknown_names_suggest_the_nearest(raw, expected):
    with pytest.raises(CollapseError) as err:
        parse_config(raw, where="c.toml")
    assert expected in str(err.value) and "\n" not in str(err.value)
    assert str(err.value).startswith("c.toml: ")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (_with("train", lr=math.nan), "finite"),
        (_with("train", lr=math.inf), "finite"),
        (_with("train", steps=True), "whole number"),
        (_with("train", steps=3.5), "whole number"),
        (_with("train", steps="3"), "whole number"),
        (_with("train", batch_size=0), "batch_size = 0 must be in [1, 4096]"),
        (_with("train", lr=0), "lr = 0.0 must be in (0, 1)"),
        (_with("train", target_modules="q_proj"), "must be a list"),
        (_with("train", target_modules=[]), "must not be empty"),
        (_with("eval", probe_sets="general"), "must be a list"),
        (_with("eval", probe_sets=[]), "must not be empty"),
        (_with("eval", probe_sets=["genral"]), "did you mean general?"),
        (_with("eval", n_ood=-1), "n_ood = -1"),
        (_with("eval", heldout_domains="some"), "'all', 'order'"),
        (_with("eval", queue_embeddings=1), "true or false"),
        (_with("probe", n_samples=0), "n_samples = 0"),
        (_with("probe", max_length=-4), "max_length = -4"),
        (_with("probe", lens_samples=-1), "lens_samples = -1 must be in [0, 100000]"),
        (_with("probe", lens_sample=8), "did you mean lens_samples?"),
        (_with("run", seeds=[0, -1]), "seeds[1] = -1"),
        (_with("run", seeds="0"), "must be a list"),
        (_with("run", seeds=[]), "must not be empty"),
        (_with("run", stages=[]), "must not be empty"),
        (_with("run", stages="sft"), "must be a list"),
        (_with("run", device="tpu"), "device = 'tpu'"),
        (_with("run", data_source="web"), "'full', 'sample'"),
        (_with("run", name=["a"]), "must be a string"),
        (_with("run", name="   "), "blank"),
        (_with("run", orders=[["sft"]], stages=["sft"]), "both stages and orders"),
        (_with("interventions", arms="replay"), "non-empty list"),
        (_with("interventions", arms=["replay", "replay"]), "twice"),
        (_with("interventions", replay={"fraction": 1.5}), "fraction = 1.5 must be in [0, 1)"),
        (_with("interventions", replay={"fraction": math.nan}), "finite"),
        (_with("interventions", refresh={"method": "cpb"}), "did you mean cbp?"),
        (_with("interventions", refresh={"rate": 2.0}), "rate = 2.0"),
        (_with("interventions", diversity={"layers": [-1]}), "layers[0] = -1"),
        (_with("interventions", diversity={"gamma": 0}), "gamma = 0.0"),
        (_with("interventions", olora={"lam": -0.5}), "lam = -0.5"),
        (_with("interventions", olora=[1]), "must be a table"),
        (_with("train", method="qlora"), "[train] method = 'qlora' must be one of 'lora', 'full'"),
        (_with("train", method="ful"), "did you mean full?"),
        ({**_with("train", method="full"), "interventions": {"arms": ["baseline", "replay+olora"]}},
         "intervention 'olora' (arm 'replay+olora') acts on LoRA adapters, but [train] method"),
        ({"run": BASE["run"], "train": [1, 2]}, "must be a table"),
        ({**_with("run", seeds=list(range(200))), "interventions": {
            "arms": ["baseline", "replay", "olora", "refresh", "diversity"] + [
                f"replay+{a}" for a in ("olora", "refresh", "diversity")]}}, "at most"),
    ],
)  # fmt: skip
def test_bad_values_are_one_line_errors(raw, expected):
    with pytest.raises(CollapseError) as err:
        parse_config(raw, where="form")
    message = str(err.value)
    assert expected in message, message
    assert "\n" not in message and message.startswith("form: ")


def test_intervention_settings_are_typed_everywhere():
    """The same dataclass validates the config table and direct construction."""
    assert Replay({"fraction": 0.5}).fraction == 0.5
    assert Replay(ReplaySettings(fraction=0.1)).fraction == 0.1
    with pytest.raises(CollapseError, match="did you mean fraction"):
        Replay({"fracton": 0.5})
    config = parse_config(_with("interventions", arms=["refresh"], refresh={"rate": 0.1}))
    assert config.interventions["refresh"] == RefreshSettings(rate=0.1)
    composite = build_interventions("refresh", config.interventions, None, ["sft"])
    assert composite.parts[0].rate == 0.1


def test_train_section_gives_the_stage_train_config():
    section = parse_config(_with("train", steps=7, lora_r=2, target_modules=["q_proj"])).train
    stage = section.stage_config(seed=1003)
    assert type(stage) is TrainConfig
    assert (stage.steps, stage.lora_r, stage.seed, stage.target_modules) == (
        7,
        2,
        1003,
        ("q_proj",),
    )


def test_full_fine_tuning_takes_every_intervention_but_olora():
    arms = ["baseline", "replay", "refresh", "diversity", "replay+refresh+diversity"]
    raw = {**_with("train", method="full", lr=3e-5), "interventions": {"arms": arms}}
    config = parse_config(raw)
    assert config.train.method == "full" and config.train.stage_config(seed=1).method == "full"
    assert config.arms == arms
    assert parse_config(BASE).train.method == "lora"  # the default
    lora = parse_config({**BASE, "interventions": {"arms": ["olora"]}})
    assert lora.arms == ["olora"]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_config_identity_is_unchanged_by_the_method_key(path):
    """Study/run ids hash the raw config: a file without ``method`` keeps the id it had before
    ``[train] method`` existed, and spelling out the default ``method = "lora"`` changes
    nothing; ``method = "full"`` is another study."""
    import hashlib

    from collapse_core.pipeline import plan_runs, study_id_for
    from collapse_core.store import dumps

    config = load_config(path)
    if "method" in config.raw.get("train", {}):
        assert config.train.method == "full"
        return
    old_formula = "study-" + hashlib.sha256(dumps(config.raw).encode()).hexdigest()[:10]
    assert study_id_for(config) == old_formula
    raw = {**config.raw, "train": {**config.raw.get("train", {}), "method": "lora"}}
    explicit = parse_config(raw)
    assert study_id_for(explicit) == old_formula
    assert [p.run_id for p in plan_runs(explicit)] == [p.run_id for p in plan_runs(config)]
    raw["train"]["method"] = "full"
    raw.pop("interventions", None)  # O-LoRA arms are refused with full fine-tuning
    assert study_id_for(parse_config(raw)) != study_id_for(
        parse_config({**raw, "train": {k: v for k, v in raw["train"].items() if k != "method"}})
    )


def test_from_table_generic_rules():
    @dataclass
    class Section:
        size: int = 1
        share: float | None = None
        names: tuple[str, ...] = ()
        LIMITS: ClassVar[dict] = {"size": Range(1, 10), "share": Range(0, 1)}

    assert from_table(Section, {"size": 3, "names": ["a"]}, "s") == Section(3, None, ("a",))
    assert from_table(Section, {"share": 1}, "s").share == 1.0  # an int is a fine float
    for bad in ({"size": 11}, {"share": -0.1}, {"names": [1]}, {"size": False}):
        with pytest.raises(CollapseError):
            from_table(Section, bad, "s")


def test_bad_config_writes_nothing(tmp_path):
    """A config that only fails at run time (missing model) is refused before the study and its
    runs are registered; via the CLI, a typo exits 2 with one line and leaves the DB as it was."""
    from collapse_core.pipeline import run_study

    store = Store(tmp_path / "db.duckdb")
    before = store.table_hashes()
    config = parse_config({"run": {**BASE["run"], "model": str(tmp_path / "no-such-model")}})
    with pytest.raises(CollapseError, match="does not exist"):
        run_study(config, store)
    assert store.table_hashes() == before
    assert store.query("SELECT count(*) AS n FROM runs")["n"][0] == 0
    bad = tmp_path / "typo.toml"
    bad.write_text((REPO / "configs" / "quick.toml").read_text().replace("n_samples", "n_sample"))
    out = subprocess.run(
        [sys.executable, "-m", "collapse_core", "run", str(bad), "--db", str(store.path)],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert "did you mean n_samples?" in out.stderr and "Traceback" not in out.stderr
    assert store.table_hashes() == before


@pytest.mark.parametrize("compare", ["", " , ", ","])
def test_compare_naming_no_arm_is_refused_not_read_as_the_whole_config(compare, tmp_path, capsys):
    from collapse_core.cli import main

    db = tmp_path / "db.duckdb"
    assert main(["run", str(REPO / "configs" / "quick.toml"), "--db", str(db), "--compare",
                 compare]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "names no arm" in err
    assert not db.exists()


def test_probe_section_reaches_the_runs_probe_config():
    """Every ``[probe]`` key a file may set is what the run's probes use (pipeline._probe_all):
    ``lens_samples = 0`` is a probe without the lens, with that probe's one cache key."""
    from collapse_core.probing import ProbeConfig

    config = parse_config(_with("probe", lens_samples=0, n_samples=100, batch_size=4))
    probe_config = config.probe.probe_config(max_prompts=7)
    assert type(probe_config) is ProbeConfig
    assert (probe_config.n_samples, probe_config.batch_size, probe_config.max_prompts) == (
        100,
        4,
        7,
    )
    assert (
        probe_config.key_fields()
        == ProbeConfig(
            max_length=probe_config.max_length, n_samples=100, max_prompts=7, logit_lens=False
        ).key_fields()
    )
    default = parse_config(_with("probe")).probe.probe_config()
    assert default.key_fields()["lens_samples"] == 64 and default.logit_lens


def test_cli_help_shows_each_options_default_once(capsys):
    from collapse_core.cli import main

    with pytest.raises(SystemExit):
        main(["probe", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "batch_size × max_length positions per forward (default: 16)" in text
    assert "(default: None)" not in text and "(default: False)" not in text
    assert text.count("(default: general)") == 1  # a help text naming its default: not twice
