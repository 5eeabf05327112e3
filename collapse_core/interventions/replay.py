"""Mixed-domain replay: a fraction ρ of every batch comes from earlier stages' training data.

Settings: ``fraction`` (ρ, default 0.25). Replayed items are response-supervised examples; DPO
pairs seen earlier are replayed as (prompt, chosen) supervision, and a DPO stage itself replays
nothing (its objective needs preference pairs). Deterministic: the draw is seeded by
(stage index, step).
"""

from __future__ import annotations

import random
from typing import Any

from ..errors import CollapseError
from .base import Intervention


def replay_count(batch_size: int, fraction: float) -> int:
    """How many of ``batch_size`` items are replayed: round(ρ·B), at most B − 1."""
    return min(batch_size - 1, round(batch_size * fraction)) if batch_size > 1 else 0


class Replay(Intervention):
    """See module docstring."""

    name = "replay"

    def __init__(self, settings: dict[str, Any], data: Any = None, order: list[str] | None = None):
        super().__init__(settings, data, order)
        self.fraction = float(self.settings.get("fraction", 0.25))
        if not 0.0 <= self.fraction < 1.0:
            raise CollapseError(f"replay fraction {self.fraction} must be in [0, 1)")
        self.n_per_stage = int(self.settings.get("n_per_stage", 64))
        self.pool: list = []
        self.index, self.stage = 0, ""

    def set_pool(self, pool: list) -> None:
        """Use an explicit replay pool (tests, notebooks)."""
        self.pool = list(pool)

    def before_stage(self, model: Any, index: int, stage: str) -> None:
        self.index, self.stage = index, stage
        if self.data is None:
            return
        from ..stagedata import Example

        pool = []
        for earlier in self.order[: index - 1]:
            for ex in self.data.get(earlier, "train", self.n_per_stage):
                if ex.chosen is not None:
                    ex = Example(prompt=ex.prompt, response=ex.chosen, meta=dict(ex.meta))
                pool.append(ex)
        self.pool = pool

    def batch_mixer(self, step: int, batch: list) -> list:
        if self.stage == "dpo" or not self.pool:
            return batch
        k = replay_count(len(batch), self.fraction)
        if k == 0:
            return batch
        rng = random.Random(self.index * 1_000_003 + step)
        replayed = [self.pool[rng.randrange(len(self.pool))] for _ in range(k)]
        return list(batch[: len(batch) - k]) + replayed
