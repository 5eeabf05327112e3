"""Device choice and mixed precision, one code path for CPU and GPU.

``resolve_device("auto")`` picks CUDA when a GPU is visible, else the CPU. ``autocast_context``
runs matmuls in bf16 on CUDA (weights and LoRA parameters stay in their own dtype, losses are
computed in fp32) and is a no-op on the CPU, so CPU results are plain fp32. (On CPUs with AMX,
bf16 autocast made a SmolLM2 LoRA step ~1.4x faster here, but it would change every stored metric
and precision is not part of the probe cache key, so it is not switched on.) Training and
evaluation code wraps every forward pass in it, so a GPU user runs exactly the code the CPU tests
run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .errors import CollapseError

__all__ = ["autocast_context", "eval_mode", "model_device", "resolve_device"]


def resolve_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"`` → ``cuda`` when available, else ``cpu``; any torch device string is accepted.

    Raises :class:`CollapseError` for an unknown name or a CUDA request without a visible GPU.
    """
    if isinstance(name, torch.device):
        device = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            device = torch.device(name)
        except RuntimeError as err:
            raise CollapseError(f"unknown device {name!r}; use auto, cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CollapseError("device cuda requested but no GPU is visible; use device cpu")
    return device


def autocast_context(device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """bf16 ``torch.autocast`` on CUDA; ``contextlib.nullcontext()`` on every other device."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (CPU for a parameter-less module)."""
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` for the block (no dropout), then its previous train/eval mode again,
    also when the block raises."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
