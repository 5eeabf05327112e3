"""Interventions against representation collapse, each a named switch of a run config.

PEFT-style: every method lives in its own module behind one small interface
(:class:`~collapse_core.interventions.base.Intervention`) and is chosen by name; an arm such as
``replay+olora`` composes several. Settings come from ``[interventions.<name>]`` in the config.

- ``replay``    mixed-domain replay: fraction ρ of every batch from earlier stages' data
- ``refresh``   continual-backprop unit re-initialisation and/or shrink-and-perturb between stages
- ``diversity`` VICReg variance + covariance penalty (optionally −log erank) on hidden states
- ``olora``     O-LoRA: λ Σ |A_past A_newᵀ| against earlier stages' LoRA A matrices
"""

from __future__ import annotations

from typing import Any

from ..errors import CollapseError
from ..names import BASELINE, INTERVENTIONS
from .base import Composite, Intervention
from .diversity import Diversity
from .olora import OLoRA
from .refresh import Refresh
from .replay import Replay

_BY_NAME: dict[str, type[Intervention]] = {
    cls.name: cls for cls in (Replay, Refresh, Diversity, OLoRA)
}
#: Intervention name → implementation, in the order of :data:`collapse_core.names.INTERVENTIONS`
#: (a name listed there without a class fails here, at import).
REGISTRY: dict[str, type[Intervention]] = {name: _BY_NAME[name] for name in INTERVENTIONS}

__all__ = ["REGISTRY", "Composite", "Intervention", "build_interventions"]


def build_interventions(
    arm: str, settings: dict[str, dict[str, Any]], data: Any, order: list[str]
) -> Composite:
    """The composed interventions of an arm (``baseline`` → none)."""
    parts: list[Intervention] = []
    for name in arm.split("+"):
        if name == BASELINE:
            continue
        if name not in REGISTRY:
            raise CollapseError(f"unknown intervention {name!r}; valid: {', '.join(REGISTRY)}")
        parts.append(REGISTRY[name](settings.get(name, {}), data=data, order=order))
    return Composite(parts)
