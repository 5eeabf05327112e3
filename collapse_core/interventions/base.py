"""The one small interface every intervention implements, and their composition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..sections import from_table


@dataclass
class NoSettings:
    """Settings of an intervention that has none."""


class Intervention:
    """Base class: override only the moments you act on.

    Moments in a run: ``before_stage`` (weights of the stage's starting checkpoint, e.g. a
    refresh), ``batch_mixer`` (which examples form each training batch), ``extra_loss`` (a term
    added to the stage objective), ``after_step`` (after each optimiser step),
    ``after_stage_adapter`` (the trained PEFT model before merging, e.g. to remember LoRA A) and
    ``after_stage`` (the merged checkpoint).
    """

    name = "base"
    needs_hidden_states = False
    #: True when the intervention acts on LoRA adapters, so a run config with
    #: ``[train] method = "full"`` refuses it (:func:`collapse_core.runconfig.parse_config`).
    lora_only: ClassVar[bool] = False
    #: The typed ``[interventions.<name>]`` table (see :mod:`collapse_core.sections`).
    Settings: ClassVar[type] = NoSettings

    def __init__(self, settings: Any = None, data: Any = None, order: list[str] | None = None):
        self.settings = self.parse_settings(settings)
        self.data = data
        self.order = list(order or [])

    @classmethod
    def parse_settings(cls, settings: Any, where: str = "config") -> Any:
        """``settings`` as :attr:`Settings`: an instance is kept, a dict (TOML table) is
        validated (unknown keys, types, ranges → one-line CollapseError)."""
        if isinstance(settings, cls.Settings):
            return settings
        return from_table(cls.Settings, settings, f"interventions.{cls.name}", where)

    def before_stage(self, model: nn.Module, index: int, stage: str) -> None:
        """Edit the starting weights of stage ``index`` in place."""

    def batch_mixer(self, step: int, batch: list) -> list:
        """Return the examples that form this step's batch."""
        return batch

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        """An extra loss term for this step, or None."""
        return None

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after every optimiser step."""

    def after_stage_adapter(self, peft_model: nn.Module, index: int, stage: str) -> None:
        """Called with the trained PEFT model before it is merged."""

    def after_stage(self, model: nn.Module, index: int, stage: str) -> None:
        """Called with the merged checkpoint of stage ``index``."""

    def set_stage(self, index: int, stage: str) -> None:
        """Tell the intervention which stage is being trained."""
        self.index, self.stage = index, stage

    def bind(self, tokenizer: Any, adapter_paths: list[str]) -> None:
        """Give the intervention the tokenizer and the saved adapters of earlier stages."""
        self.tokenizer = tokenizer
        self.adapter_paths = list(adapter_paths)


class Composite(Intervention):
    """Several interventions applied together, in the order given."""

    name = "composite"

    def __init__(self, parts: list[Intervention]):
        super().__init__({})
        self.parts = parts
        self.needs_hidden_states = any(p.needs_hidden_states for p in parts)

    def bind(self, tokenizer: Any, adapter_paths: list[str]) -> None:
        for part in self.parts:
            part.bind(tokenizer, adapter_paths)

    def before_stage(self, model: nn.Module, index: int, stage: str) -> None:
        for part in self.parts:
            part.set_stage(index, stage)
            part.before_stage(model, index, stage)

    def batch_mixer(self, step: int, batch: list) -> list:
        for part in self.parts:
            batch = part.batch_mixer(step, batch)
        return batch

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        terms = [t for p in self.parts if (t := p.extra_loss(model, batch, outputs)) is not None]
        return sum(terms) if terms else None

    def after_step(self, model: nn.Module, step: int) -> None:
        for part in self.parts:
            part.after_step(model, step)

    def after_stage_adapter(self, peft_model: nn.Module, index: int, stage: str) -> None:
        for part in self.parts:
            part.after_stage_adapter(peft_model, index, stage)

    def after_stage(self, model: nn.Module, index: int, stage: str) -> None:
        for part in self.parts:
            part.after_stage(model, index, stage)

    def hooks(self, index: int, stage: str) -> Any:
        """The training-loop hooks for stage ``index`` (None when there is nothing to do)."""
        if not self.parts:
            return None
        from ..train import TrainHooks

        return TrainHooks(
            batch_mixer=self.batch_mixer,
            extra_loss=self.extra_loss,
            after_step=self.after_step,
            needs_hidden_states=self.needs_hidden_states,
        )
