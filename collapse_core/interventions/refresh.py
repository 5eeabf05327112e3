"""Feature refresh between stages.

Two methods (``method = "cbp" | "shrink_perturb" | "both"``):

- continual backprop (Dohare et al. 2024, Nature): utility of MLP unit i is the running average
  u ← η·u + (1−η)·|h_i|·Σ_k|W_out[k, i]| over the upcoming stage's training tokens; the ``rate``
  fraction of lowest-utility units per layer gets fresh input weights (N(0, σ_init)) and zero
  output weights, so the network's function is unchanged at the moment of refresh;
- shrink-and-perturb (Ash & Adams 2020): θ ← λ·θ + σ·ε, ε ~ N(0, 1), on every block's linear
  weights.

Settings: ``method`` ("cbp"), ``rate`` (0.02), ``decay`` η (0.99), ``utility_batches`` (4),
``shrink`` λ (0.98), ``noise`` σ (1e-3), ``seed`` (0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..devices import eval_mode
from ..errors import CollapseError
from ..models import model_parts
from ..sections import Range
from .base import Intervention


def _mlp_in_out(
    block: nn.Module,
) -> tuple[list[tuple[torch.Tensor, int]], tuple[torch.Tensor, int]]:
    """(input weights with their unit axis, output weight with its unit axis) of a block's MLP.

    Llama-style: gate_proj/up_proj (units × d, axis 0), down_proj (d × units, axis 1).
    GPT-2 Conv1D: c_fc (d × units, axis 1), c_proj (units × d, axis 0).
    """
    mlp = block.mlp
    if hasattr(mlp, "down_proj"):
        ins = [(getattr(mlp, n).weight, 0) for n in ("gate_proj", "up_proj") if hasattr(mlp, n)]
        return ins, (mlp.down_proj.weight, 1)
    if hasattr(mlp, "c_fc"):
        return [(mlp.c_fc.weight, 1)], (mlp.c_proj.weight, 0)
    raise CollapseError("refresh supports llama-style and gpt2 MLPs only")


@torch.no_grad()
def unit_utilities(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], decay: float = 0.99
) -> list[torch.Tensor]:
    """Continual-backprop contribution utility per MLP unit and block (Dohare et al. 2024)."""
    parts = model_parts(model)
    utilities: list[torch.Tensor | None] = [None] * len(parts.blocks)
    handles = []
    for i, (block, proj) in enumerate(zip(parts.blocks, parts.mlp_out, strict=True)):
        _, (w_out, axis) = _mlp_in_out(block)
        out_mass = w_out.abs().sum(dim=1 - axis).float()

        def hook(module: nn.Module, args: tuple, i: int = i, out_mass=out_mass) -> None:
            acts = args[0].float().abs().reshape(-1, args[0].shape[-1]).mean(0)
            inst = acts * out_mass
            prev = utilities[i]
            utilities[i] = inst if prev is None else decay * prev + (1 - decay) * inst

        handles.append(proj.register_forward_pre_hook(hook))
    try:
        for batch in batches:
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return [u if u is not None else torch.zeros(0) for u in utilities]


@torch.no_grad()
def refresh_units(
    model: nn.Module, utilities: list[torch.Tensor], rate: float, seed: int = 0
) -> dict[int, torch.Tensor]:
    """Re-initialise the ``rate`` lowest-utility MLP units per block; returns the indices.

    Input weights of a chosen unit ← N(0, initializer_range²); its output weights ← 0. Every
    other parameter stays bit-identical.
    """
    parts = model_parts(model)
    std = float(getattr(model.config, "initializer_range", 0.02))
    gen = torch.Generator().manual_seed(seed)
    chosen: dict[int, torch.Tensor] = {}
    for i, block in enumerate(parts.blocks):
        util = utilities[i]
        k = int(round(rate * util.numel()))
        if k == 0:
            continue
        idx = torch.argsort(util, stable=True)[:k]
        ins, (w_out, out_axis) = _mlp_in_out(block)
        for w_in, axis in ins:
            shape = list(w_in.shape)
            shape[axis] = k
            fresh = torch.randn(shape, generator=gen) * std
            w_in.index_copy_(axis, idx.to(w_in.device), fresh.to(w_in.dtype).to(w_in.device))
        shape = list(w_out.shape)
        shape[out_axis] = k
        w_out.index_copy_(
            out_axis, idx.to(w_out.device), torch.zeros(shape, dtype=w_out.dtype,
                                                       device=w_out.device)
        )  # fmt: skip
        chosen[i] = idx
    return chosen


@torch.no_grad()
def shrink_and_perturb(model: nn.Module, shrink: float, noise: float, seed: int = 0) -> None:
    """θ ← λθ + σε on every linear weight inside the transformer blocks (Ash & Adams 2020)."""
    gen = torch.Generator().manual_seed(seed)
    for block in model_parts(model).blocks:
        for module in block.modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and weight.dim() == 2:
                eps = torch.randn(weight.shape, generator=gen).to(weight.device, weight.dtype)
                weight.mul_(shrink).add_(noise * eps)


@dataclass
class RefreshSettings:
    """``[interventions.refresh]``: see the module docstring for each setting."""

    method: Literal["cbp", "shrink_perturb", "both"] = "cbp"
    rate: float = 0.02
    decay: float = 0.99
    utility_batches: int = 4
    shrink: float = 0.98
    noise: float = 1e-3
    seed: int = 0

    LIMITS: ClassVar[dict[str, Range]] = {
        "rate": Range(0, 1), "decay": Range(0, 1), "utility_batches": Range(1, 1000),
        "shrink": Range(0, 1), "noise": Range(0, 10), "seed": Range(0, 2**31 - 1),
    }  # fmt: skip


class Refresh(Intervention):
    """See module docstring."""

    name = "refresh"
    Settings = RefreshSettings

    def __init__(self, settings: Any = None, data: Any = None, order: list[str] | None = None):
        super().__init__(settings, data, order)
        s = self.settings
        self.method, self.rate, self.decay = s.method, s.rate, s.decay
        self.utility_batches, self.shrink, self.noise, self.seed = (
            s.utility_batches, s.shrink, s.noise, s.seed,
        )  # fmt: skip
        self.last_refreshed: dict[int, torch.Tensor] = {}

    def _utility_batches(self, model: nn.Module, stage: str) -> list[dict[str, torch.Tensor]]:
        examples = self.data.get(stage, "train", 4 * self.utility_batches)
        texts = [f"{e.prompt}\n{e.response or e.chosen or ''}" for e in examples]
        device = next(model.parameters()).device
        batches = []
        for i in range(0, len(texts), 4):
            enc = self.tokenizer(texts[i : i + 4], return_tensors="pt", padding=True,
                                 truncation=True, max_length=128)  # fmt: skip
            batches.append({k: v.to(device) for k, v in enc.items() if k in
                            ("input_ids", "attention_mask")})  # fmt: skip
        return batches

    def before_stage(self, model: nn.Module, index: int, stage: str) -> None:
        if index == 1:
            return  # nothing to refresh before the first stage
        if self.method in ("cbp", "both") and self.data is not None:
            with eval_mode(model):
                utilities = unit_utilities(model, self._utility_batches(model, stage), self.decay)
            self.last_refreshed = refresh_units(model, utilities, self.rate, self.seed + index)
        if self.method in ("shrink_perturb", "both"):
            shrink_and_perturb(model, self.shrink, self.noise, self.seed + index)
