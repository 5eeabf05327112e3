"""The one list of post-training stages and the one list of intervention arms.

Deliberately tiny and import-free (no torch), so run configs, pages, the stage-data loaders,
the training loop, the pipeline and the intervention registry can all read from here.
``tests/test_names.py`` fails when a consumer drifts (a stage without data or objective, an
intervention without an implementation, ...).
"""

from __future__ import annotations

#: Post-training stages in their default pipeline order → the stage's training objective:
#: ``"sft"`` = response-only cross-entropy, ``"dpo"`` = the preference loss of Rafailov et al.
#: (2023) on (chosen, rejected) pairs.
STAGE_OBJECTIVES: dict[str, str] = {
    "sft": "sft",
    "dpo": "dpo",
    "safety": "sft",
    "math": "sft",
    "code": "sft",
    "long_cot": "sft",
}
STAGES: tuple[str, ...] = tuple(STAGE_OBJECTIVES)

#: The arm without any intervention, against which every other arm is compared.
BASELINE = "baseline"
#: Interventions against collapse, each implemented by the class of the same ``name`` in
#: :data:`collapse_core.interventions.REGISTRY`; an arm is one of them or several joined by "+".
INTERVENTIONS: tuple[str, ...] = ("replay", "refresh", "diversity", "olora")
ARMS: tuple[str, ...] = (BASELINE, *INTERVENTIONS)
