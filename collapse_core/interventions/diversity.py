"""Representation-diversity regularisation on hidden states of chosen layers.

VICReg-style (Bardes et al. 2022) on the response/valid tokens of a batch, made scale-free by
first dividing the token vectors Z (n×d) by their root-mean-square norm over the batch:

- variance term  v(Z) = (1/d) Σ_j max(0, γ − sqrt(Var(Z_j) + ε))
- covariance term c(Z) = (1/d) Σ_{i≠j} C(Z)_{ij}²
- optional       −log erank(Z)  (Roy & Vetterli 2007), differentiable through svdvals

loss = μ · (w_var·v + w_cov·c + w_erank·(−log erank)). With the RMS scaling, γ = 1/sqrt(d)
corresponds to isotropy (each direction carrying an equal share of the variance).

Settings: ``mu`` (0.1), ``layers`` (list of block indices; default the middle and last block),
``gamma`` (default 1/sqrt(d)), ``var_weight`` (1.0), ``cov_weight`` (1.0), ``erank_weight`` (0.0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import CollapseError
from ..sections import Range
from .base import Intervention


def vicreg_terms(z: torch.Tensor, gamma: float | None = None, eps: float = 1e-4):
    """(variance term, covariance term) of token vectors ``z`` (n×d) after RMS scaling."""
    n, d = z.shape
    z = z.float()
    z = z / z.pow(2).sum(-1).mean().sqrt().clamp_min(1e-8)
    gamma = 1.0 / math.sqrt(d) if gamma is None else gamma
    centred = z - z.mean(0)
    std = torch.sqrt(centred.var(0) + eps)
    var_term = torch.relu(gamma - std).mean()
    cov = centred.T @ centred / max(n - 1, 1)
    off = cov - torch.diag(torch.diag(cov))
    # Divided by d as in VICReg.
    cov_term = off.pow(2).sum() / d
    return var_term, cov_term


def neg_log_erank(z: torch.Tensor) -> torch.Tensor:
    """−log effective rank = Σ p log p with p = σ/Σσ of centred z (differentiable)."""
    sv = torch.linalg.svdvals(z.float() - z.float().mean(0))
    p = sv / sv.sum().clamp_min(1e-12) + 1e-7
    return (p * p.log()).sum()


def diversity_penalty(
    z: torch.Tensor,
    gamma: float | None = None,
    var_weight: float = 1.0,
    cov_weight: float = 1.0,
    erank_weight: float = 0.0,
) -> torch.Tensor:
    """The weighted sum of the terms above for one layer's token vectors."""
    var_term, cov_term = vicreg_terms(z, gamma)
    total = var_weight * var_term + cov_weight * cov_term
    if erank_weight:
        total = total + erank_weight * neg_log_erank(z)
    return total


@dataclass
class DiversitySettings:
    """``[interventions.diversity]``: see the module docstring for each setting."""

    mu: float = 0.1
    layers: list[int] | None = None
    gamma: float | None = None
    var_weight: float = 1.0
    cov_weight: float = 1.0
    erank_weight: float = 0.0

    LIMITS: ClassVar[dict[str, Range]] = {
        "mu": Range(0, 1000), "layers": Range(0, 10_000), "gamma": Range(0, 100, lo_open=True),
        "var_weight": Range(0, 1000), "cov_weight": Range(0, 1000),
        "erank_weight": Range(0, 1000),
    }  # fmt: skip
    NON_EMPTY: ClassVar[tuple[str, ...]] = ("layers",)


class Diversity(Intervention):
    """See module docstring."""

    name = "diversity"
    needs_hidden_states = True
    Settings = DiversitySettings

    def __init__(self, settings: Any = None, data: Any = None, order: list[str] | None = None):
        super().__init__(settings, data, order)
        s = self.settings
        self.mu, self.layers, self.gamma = s.mu, s.layers, s.gamma
        self.var_weight, self.cov_weight, self.erank_weight = (
            s.var_weight, s.cov_weight, s.erank_weight,
        )  # fmt: skip

    def extra_loss(self, model: Any, batch: Any, outputs: Any) -> torch.Tensor | None:
        hidden = getattr(outputs, "hidden_states", None)
        if hidden is None:
            return None
        n_blocks = len(hidden) - 1
        layers = self.layers or sorted({n_blocks // 2, n_blocks})
        if max(layers) > n_blocks:
            raise CollapseError(
                f"[interventions.diversity] layers {layers}: this model has layers 0..{n_blocks}"
            )
        mask = batch["attention_mask"].bool() if "attention_mask" in batch else None
        total = None
        for layer in layers:
            h = hidden[layer]
            z = h[mask] if mask is not None else h.reshape(-1, h.shape[-1])
            term = diversity_penalty(
                z, self.gamma, self.var_weight, self.cov_weight, self.erank_weight
            )
            total = term if total is None else total + term
        return None if total is None else self.mu * total / len(layers)
