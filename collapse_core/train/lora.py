"""Save, merge and read LoRA adapters.

PEFT naming (Hu et al. 2021, LoRA): for a layer y = W₀x with W₀ of shape (out × in), the
adapter adds ΔW x with ΔW = scaling · B A, where ``lora_A`` is A (r × in), ``lora_B`` is
B (out × r) and scaling = α / r (α / √r with rsLoRA). Every ΔW here is in this (out × in)
"nn.Linear" orientation, also for GPT-2's ``Conv1D`` layers, whose stored weight is (in × out):
:func:`module_weight` returns such weights transposed so W₀ and ΔW always line up.

Module names are those of the plain base model (``model.layers.0.self_attn.q_proj``), i.e. the
PEFT prefix ``base_model.model.`` is stripped, so they match the merged checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CollapseError

PEFT_PREFIX = "base_model.model."

__all__ = [
    "delta_arrays",
    "delta_weight",
    "load_adapter_deltas",
    "lora_deltas",
    "merge_and_unload",
    "module_weight",
    "save_adapter",
]


def save_adapter(peft_model: nn.Module, path: Path | str) -> Path:
    """Save the adapter (``adapter_config.json`` + safetensors) atomically to ``path``.

    Written to ``<path>.tmp`` first and renamed, so a killed process leaves no half adapter.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(str(tmp), safe_serialization=True)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    return path


def merge_and_unload(peft_model: nn.Module) -> nn.Module:
    """Fold ΔW = scaling · B A into the base weights and return the plain base model.

    The merged weights are the next stage's starting checkpoint. Parameters keep the
    ``requires_grad=False`` PEFT gave them (the next :func:`train_stage` wraps again anyway).
    """
    if not hasattr(peft_model, "merge_and_unload"):
        raise CollapseError("merge_and_unload needs a PEFT model (the result of train_stage)")
    return peft_model.merge_and_unload()


def _strip(name: str) -> str:
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def lora_deltas(
    peft_model: nn.Module, adapter_name: str = "default"
) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``{module name: (A, B, scaling)}`` for every LoRA layer of ``adapter_name``.

    A is ``lora_A`` (r × in), B is ``lora_B`` (out × r), both detached fp32 CPU copies;
    scaling = α / r (α / √r with rsLoRA). ΔW = :func:`delta_weight` (A, B, scaling).
    """
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for name, module in peft_model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        lora_b = getattr(module, "lora_B", None)
        if not isinstance(lora_a, nn.ModuleDict) or adapter_name not in lora_a:
            continue
        a = lora_a[adapter_name].weight.detach().float().cpu().clone()
        b = lora_b[adapter_name].weight.detach().float().cpu().clone()
        out[_strip(name)] = (a, b, float(module.scaling[adapter_name]))
    return out


def delta_weight(a: Any, b: Any, scaling: float) -> Any:
    """ΔW = scaling · B @ A, shape (out × in); A is r × in, B is out × r (torch or numpy)."""
    return scaling * (b @ a)


def delta_arrays(deltas: dict[str, tuple[Any, Any, float]]) -> dict[str, np.ndarray]:
    """``{module: ΔW}`` as float32 numpy arrays from ``{module: (A, B, scaling)}`` (the output
    of :func:`lora_deltas` or :func:`load_adapter_deltas`); ΔW = :func:`delta_weight`."""
    out = {}
    for module, (a, b, scaling) in deltas.items():
        out[module] = delta_weight(a, b, scaling).detach().float().cpu().numpy()
    return out


def load_adapter_deltas(path: Path | str) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Read ``{module: (A, B, scaling)}`` from a saved PEFT LoRA adapter directory.

    Reads ``adapter_config.json`` (r, lora_alpha, use_rslora, rank_pattern, alpha_pattern) and
    ``adapter_model.safetensors`` (no pickle); names as in :func:`lora_deltas`.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config_file, weights_file = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not config_file.exists() or not weights_file.exists():
        raise CollapseError(f"{path} is not a saved LoRA adapter (need adapter_config.json "
                            "and adapter_model.safetensors)")  # fmt: skip
    config = json.loads(config_file.read_text())
    tensors = load_file(str(weights_file))
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        module = _strip(key[: -len(".lora_A.weight")])
        b = tensors.get(key.replace(".lora_A.weight", ".lora_B.weight"))
        if b is None:
            raise CollapseError(f"adapter {path.name} has lora_A but no lora_B for {module}")
        r = _pattern(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        scaling = alpha / (r**0.5) if config.get("use_rslora") else alpha / r
        out[module] = (a.float(), b.float(), float(scaling))
    return out


def _pattern(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT rank/alpha patterns: a key matches when the module name ends with it."""
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def module_weight(model: nn.Module, name: str) -> np.ndarray:
    """Weight of module ``name`` as a float64 (out × in) array (Conv1D weights transposed)."""
    from transformers.pytorch_utils import Conv1D

    module = model.get_submodule(name)
    weight = module.weight.detach().double().cpu().numpy()
    return weight.T.copy() if isinstance(module, Conv1D) else weight
