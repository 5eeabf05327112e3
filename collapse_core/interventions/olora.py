"""LoRA-update decorrelation (O-LoRA, Wang et al. 2023, "Orthogonal subspace learning for
language model continual learning").

While training stage t, add λ · Σ_modules Σ_{s<t} Σ_{i,j} |(A_s A_tᵀ)_{ij}| where A are the LoRA
down-projections. PEFT names them ``lora_A`` with shape (r × in), so A_s A_tᵀ is (r_s × r_t) and
is zero exactly when the row spaces (input subspaces) of the two updates are orthogonal.

Settings: ``lam`` λ (0.5, the paper's λ₁).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..sections import Range
from .base import Intervention


def olora_penalty(past: list[torch.Tensor], new: torch.Tensor) -> torch.Tensor:
    """Σ_s Σ |A_s A_newᵀ| (L1 of every past/new A product) for one module."""
    total = new.new_zeros(())
    for a_past in past:
        total = total + (a_past.to(new.device, new.dtype) @ new.T).abs().sum()
    return total


def module_key(name: str) -> str:
    """A PEFT module name without wrapper prefixes/suffixes, e.g. ``model.layers.0.self_attn.q_proj``."""
    for prefix in ("base_model.model.",):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    for suffix in (".lora_A.default.weight", ".lora_A.weight", ".lora_A.default"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def load_adapter_a(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """The lora_A matrices of a saved PEFT adapter, keyed by :func:`module_key`."""
    from safetensors.torch import load_file

    tensors = load_file(str(Path(adapter_dir) / "adapter_model.safetensors"))
    return {module_key(k): v.float() for k, v in tensors.items() if ".lora_A." in k}


def current_a(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable lora_A weights of a PEFT model, keyed by :func:`module_key`."""
    out = {}
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and "default" in lora_a:
            out[module_key(name)] = lora_a["default"].weight
    return out


@dataclass
class OLoRASettings:
    """``[interventions.olora]``: ``lam`` λ, the weight of the penalty."""

    lam: float = 0.5

    LIMITS: ClassVar[dict[str, Range]] = {"lam": Range(0, 1000)}


class OLoRA(Intervention):
    """See module docstring."""

    name = "olora"
    Settings = OLoRASettings
    lora_only = True  # the penalty is on LoRA A matrices: full fine-tuning has none

    def __init__(self, settings: Any = None, data: Any = None, order: list[str] | None = None):
        super().__init__(settings, data, order)
        self.lam = self.settings.lam
        self.past: dict[str, list[torch.Tensor]] = {}

    def before_stage(self, model: nn.Module, index: int, stage: str) -> None:
        self.past = {}
        for path in getattr(self, "adapter_paths", []):
            for key, a in load_adapter_a(path).items():
                self.past.setdefault(key, []).append(a)

    def extra_loss(self, model: nn.Module, batch: Any, outputs: Any) -> torch.Tensor | None:
        if not self.past:
            return None
        total = None
        for key, a_new in current_a(model).items():
            if key in self.past:
                term = olora_penalty(self.past[key], a_new)
                total = term if total is None else total + term
        return None if total is None else self.lam * total
