"""Next-token distribution metrics from logits (last axis = vocabulary).

The numpy forms return float64 numpy arrays; the ``*_torch`` forms stay on the tensor's device
(for the probe's hot path) and compute in at least float32 (bf16/fp16 logits are upcast).
Logits of −inf (masked tokens) have probability 0 and contribute 0 to the entropy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .spectral import as_numpy

__all__ = [
    "entropy_from_logits",
    "entropy_from_logits_torch",
    "top1_margin_from_logits",
    "top1_margin_from_logits_torch",
]


def _log_softmax(logits: Any) -> np.ndarray:
    z = as_numpy(logits)
    if z.ndim < 1 or z.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty last (vocabulary) axis, got {z.shape}")
    if np.any(np.isnan(z)) or np.any(z == np.inf):
        raise ValueError("logits contain NaN or +inf")
    m = np.max(z, axis=-1, keepdims=True)
    if np.any(m == -np.inf):
        raise ValueError("a row of logits is entirely -inf")
    shifted = z - m
    return shifted - np.log(np.sum(np.exp(shifted), axis=-1, keepdims=True))


def entropy_from_logits(logits: Any) -> np.ndarray:
    """Entropy H = −Σ_v p_v log p_v (nats) of softmax(logits) over the last axis, per row.

    Uses a stable log-softmax (log p = z − max z − log Σ exp(z − max z)). Shape
    ``logits.shape[:-1]``. Uniform logits over V tokens give log V (Shannon 1948).
    """
    logp = _log_softmax(logits)
    p = np.exp(logp)
    return -np.sum(p * np.where(p > 0, logp, 0.0), axis=-1)


def top1_margin_from_logits(logits: Any) -> np.ndarray:
    """Probability margin p_(1) − p_(2) between the two most likely tokens, per row.

    p = softmax(logits) over the last axis (needs V ≥ 2). 0 for a tie, → 1 for a confident
    prediction. Shape ``logits.shape[:-1]``.
    """
    logp = _log_softmax(logits)
    if logp.shape[-1] < 2:
        raise ValueError("top-1 margin needs a vocabulary of at least 2")
    top2 = np.sort(np.partition(logp, logp.shape[-1] - 2, axis=-1)[..., -2:], axis=-1)
    p = np.exp(top2)
    return p[..., 1] - p[..., 0]


def _torch_float(logits: Any) -> Any:
    """Upcast bf16/fp16 (and integer) logits to float32; float32/float64 pass through."""
    import torch

    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"logits must have a non-empty last axis, got {tuple(logits.shape)}")
    return logits if logits.dtype in (torch.float32, torch.float64) else logits.float()


def entropy_from_logits_torch(logits: Any) -> Any:
    """Torch version of :func:`entropy_from_logits`; returns a tensor on the same device.

    H = −Σ_v p_v log p_v with log p = log_softmax(z) in ≥ float32; −inf logits contribute 0.
    """
    import torch

    z = _torch_float(logits)
    logp = torch.log_softmax(z, dim=-1)
    p = logp.exp()
    return -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(-1)


def top1_margin_from_logits_torch(logits: Any) -> Any:
    """Torch version of :func:`top1_margin_from_logits` (p_(1) − p_(2)); same device."""
    import torch

    z = _torch_float(logits)
    if z.shape[-1] < 2:
        raise ValueError("top-1 margin needs a vocabulary of at least 2")
    top2 = torch.softmax(z, dim=-1).topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]
