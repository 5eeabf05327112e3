"""Full fine-tuning helpers: the frozen copy of a stage's starting weights and its updates.

A full-FT stage trains every parameter of the model in place (``[train] method = "full"``).
The stage's starting weights are kept as one frozen copy (:func:`frozen_copy`: no grad, eval
mode) that serves three purposes: the DPO reference model (Rafailov et al. 2023 take the
reference as the starting policy; with LoRA that is the same network with the adapter off),
the undo of a failed stage (:func:`restore_weights`), and the starting point of the updates
ΔW = W_after − W_before (:func:`weight_deltas`) whose geometry
:mod:`collapse_core.train.lora_metrics` measures exactly as it does for LoRA's ΔW = (α/r) B A.

Tied weights (SmolLM2 ties the input embedding and the LM head) are one ``Parameter``:
``model.parameters()`` yields it once, so AdamW updates it once and the tie survives training
and ``save_pretrained``; ``copy.deepcopy`` keeps the tie inside the copy as well.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from .lora import module_weight

__all__ = ["frozen_copy", "restore_weights", "target_module_names", "weight_deltas"]


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` in eval mode with every parameter's ``requires_grad`` False."""
    start = copy.deepcopy(model)
    start.eval()
    start.requires_grad_(False)
    return start


@torch.no_grad()
def restore_weights(model: nn.Module, start: nn.Module) -> None:
    """Copy every parameter and buffer of ``start`` back into ``model`` (same architecture),
    casting to ``model``'s dtypes."""
    pairs = [*zip(model.parameters(), start.parameters(), strict=True),
             *zip(model.buffers(), start.buffers(), strict=True)]  # fmt: skip
    for target, source in pairs:
        target.copy_(source)


def target_module_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Full names of the modules whose last name part is one of ``targets`` (the modules LoRA
    would adapt: the same selection PEFT makes from ``target_modules``)."""
    wanted = set(targets)
    return [name for name, _ in model.named_modules() if name and name.rsplit(".", 1)[-1] in wanted]


def weight_deltas(
    start: nn.Module, model: nn.Module, targets: Iterable[str]
) -> dict[str, np.ndarray]:
    """``{module: ΔW = W_model − W_start}`` as float32 (out × in) arrays for the target modules.

    The difference is taken in float64 (exact for float32/bf16 weights) and stored as float32,
    the dtype the rank rule of :func:`~collapse_core.train.lora_metrics.left_singular_subspace`
    then uses for its epsilon, as for a LoRA ΔW computed in float32.
    """
    return {
        name: (module_weight(model, name) - module_weight(start, name)).astype(np.float32)
        for name in target_module_names(model, targets)
    }
