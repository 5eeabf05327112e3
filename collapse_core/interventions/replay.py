"""Mixed-domain replay: a fraction ρ of every batch comes from earlier stages' training data.

Settings: ``fraction`` (ρ, default 0.25). Replayed items are response-supervised examples; DPO
pairs seen earlier are replayed as (prompt, chosen) supervision, and a DPO stage itself replays
nothing (its objective needs preference pairs). Deterministic: the draw is seeded by
(stage index, step).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, ClassVar

from ..sections import Range
from .base import Intervention


def replay_count(batch_size: int, fraction: float) -> int:
    """How many of ``batch_size`` items are replayed: round(ρ·B), at most B − 1."""
    return min(batch_size - 1, round(batch_size * fraction)) if batch_size > 1 else 0


@dataclass
class ReplaySettings:
    """``[interventions.replay]``: ``fraction`` ρ of each batch replayed, ``n_per_stage``
    examples drawn from each earlier stage into the replay pool."""

    fraction: float = 0.25
    n_per_stage: int = 64

    LIMITS: ClassVar[dict[str, Range]] = {
        "fraction": Range(0, 1, hi_open=True), "n_per_stage": Range(1, 100_000),
    }  # fmt: skip


class Replay(Intervention):
    """See module docstring."""

    name = "replay"
    Settings = ReplaySettings

    def __init__(self, settings: Any = None, data: Any = None, order: list[str] | None = None):
        super().__init__(settings, data, order)
        self.fraction = self.settings.fraction
        self.n_per_stage = self.settings.n_per_stage
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
