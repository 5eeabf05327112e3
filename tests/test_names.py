"""One list of stages and one of arms (collapse_core.names): every consumer reads it, none
keeps a copy that could drift."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from collapse_core import names, stagedata, views
from collapse_core.errors import CollapseError
from collapse_core.interventions import REGISTRY, build_interventions
from collapse_core.interventions.base import Composite
from collapse_core.pipeline import StageData, heldout_domains
from collapse_core.runconfig import parse_config
from collapse_core.train import OBJECTIVES

REPO = Path(__file__).resolve().parent.parent


def _config(**run):
    return parse_config({"run": {"name": "names", "model": "smollm2", "stages": ["sft"],
                                 "data_source": "sample", **run}})  # fmt: skip


@pytest.mark.parametrize("stage", names.STAGES)
def test_every_stage_has_data_and_an_objective(stage):
    assert stage in stagedata._BUILDERS  # full data
    train = stagedata.load_stage(stage, "train", 2, source="sample")
    heldout = stagedata.load_stage(stage, "heldout", 2, source="sample")
    assert train and heldout
    assert OBJECTIVES[stage] == names.STAGE_OBJECTIVES[stage] in ("sft", "dpo")
    pairs = [e.chosen is not None and e.rejected is not None for e in train]
    assert all(pairs) if OBJECTIVES[stage] == "dpo" else not any(pairs)


def test_no_stage_without_a_name():
    assert set(stagedata._BUILDERS) == set(names.STAGES)
    assert set(OBJECTIVES) == {*names.STAGES, "plasticity"}
    # every stage is accepted by configs, in any order, and evaluated on its held-out split
    config = _config(stages=list(reversed(names.STAGES)))
    assert config.orders == [list(reversed(names.STAGES))]
    assert sorted(heldout_domains(config, ["math"])) == sorted(names.STAGES)
    with pytest.raises(CollapseError, match="valid stages: " + ", ".join(names.STAGES)):
        _config(stages=["pretrain"])
    with pytest.raises(CollapseError, match="unknown stage"):
        stagedata.load_stage("pretrain", "train", 1, source="sample")
    assert set(views.STAGE_BEHAVIOUR) <= set(names.STAGES)


def test_registry_implements_exactly_the_interventions():
    assert tuple(REGISTRY) == names.INTERVENTIONS
    assert all(cls.name == name for name, cls in REGISTRY.items())
    assert names.ARMS == (names.BASELINE, *names.INTERVENTIONS)


@pytest.mark.parametrize("arm", [*names.ARMS, "+".join(names.INTERVENTIONS)])
def test_every_arm_is_accepted_and_builds(arm):
    config = _config(stages=["sft", "math"])
    config = parse_config({**config.raw, "interventions": {"arms": [arm]}})
    assert config.arms == [arm]
    built = build_interventions(arm, config.interventions, StageData(config, 0), ["sft", "math"])
    assert isinstance(built, Composite)
    expected = [] if arm == names.BASELINE else arm.split("+")
    assert [part.name for part in built.parts] == expected


def _name_lists(path: Path) -> list[tuple[int, list[str]]]:
    """Tuple/list/set literals in a file holding three or more stage or intervention names."""
    known = set(names.STAGES) | set(names.INTERVENTIONS)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Tuple | ast.List | ast.Set):
            items = [e.value for e in node.elts if isinstance(e, ast.Constant)]
            hits = [v for v in items if isinstance(v, str) and v in known]
            if len(hits) >= 3:
                found.append((node.lineno, hits))
    return found


def test_no_second_list_of_stages_or_arms():
    """A copied list (like the former runconfig.STAGES / ARMS) is what drifts; read names."""
    files = [*(REPO / "collapse_core").rglob("*.py"), *(REPO / "pages").glob("*.py"),
             REPO / "app.py"]  # fmt: skip
    copies = {
        str(f.relative_to(REPO)): lists
        for f in files
        if f.name != "names.py" and (lists := _name_lists(f))
    }
    assert not copies, f"stage/arm names listed outside collapse_core/names.py: {copies}"


def test_the_scan_sees_a_copied_list(tmp_path):
    copied = tmp_path / "copy.py"
    copied.write_text('STAGES = ("sft", "dpo", "math")\nX = ["a", "replay"]\n', encoding="utf-8")
    assert _name_lists(copied) == [(1, ["sft", "dpo", "math"])]
