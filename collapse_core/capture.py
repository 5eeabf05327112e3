"""Streaming capture of hidden states: one forward pass per batch, O(layers·d²) memory.

For every layer ℓ (0 = token embeddings, ℓ = output of block ℓ) and every batch we add the valid
(non-padding) token vectors into running sums instead of keeping them:

- shifted moments Σ(x−c), Σ(x−c)(x−c)ᵀ with c = the first batch's mean (shifted-data algorithm,
  Chan et al. 1983: avoids the catastrophic cancellation of Σxxᵀ − Nμμᵀ when hidden states carry
  huge mean components, as LLM residual streams do);
- Σ x̂ of unit vectors overall and per prompt (streaming anisotropy and homogeneity);
- Σ|h_i| of every MLP unit (input of the MLP's output projection) for dormant units;
- logit-lens entropy (final norm + LM head) on the fixed token subsample only, which keeps the
  cost of 31 extra LM-head products small;
- the fixed-seed token subsample itself (stored for TwoNN, CKA, UMAP).

The hooks do their work as each block finishes, so at most one layer's activations of one batch
exist beyond what the forward pass itself holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .models import ModelParts

# Bumped whenever what the capture accumulates changes (part of every probe's cache key).
CAPTURE_VERSION = "2"


@dataclass
class LayerMoments:
    """Running sums for one layer (all float64, on the probe's device)."""

    d: int
    n_prompts: int
    device: torch.device
    n: int = 0
    shift: torch.Tensor | None = None
    sum_x: torch.Tensor = field(init=False)
    sum_xx: torch.Tensor = field(init=False)
    sum_unit: torch.Tensor = field(init=False)
    prompt_unit: torch.Tensor = field(init=False)
    prompt_count: torch.Tensor = field(init=False)
    sum_norm: float = 0.0

    def __post_init__(self) -> None:
        kw = {"dtype": torch.float64, "device": self.device}
        self.sum_x = torch.zeros(self.d, **kw)
        self.sum_xx = torch.zeros(self.d, self.d, **kw)
        self.sum_unit = torch.zeros(self.d, **kw)
        # Per-prompt sums hold at most max_length unit vectors each: float32 is ample.
        self.prompt_unit = torch.zeros(self.n_prompts, self.d, dtype=torch.float32,
                                       device=self.device)  # fmt: skip
        self.prompt_count = torch.zeros(self.n_prompts, **kw)

    def add(self, x: torch.Tensor, prompt_idx: torch.Tensor) -> None:
        """Add token vectors ``x`` (n×d, any float dtype) belonging to prompts ``prompt_idx``."""
        x = x.float()
        if self.shift is None:
            self.shift = x.mean(0)
        centred = x - self.shift
        # fp32 product on fp32-shifted data, accumulated in fp64 across batches.
        self.sum_xx += (centred.T @ centred).double()
        self.sum_x += centred.sum(0).double()
        norms = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        unit = x / norms
        self.sum_unit += unit.sum(0).double()
        self.prompt_unit.index_add_(0, prompt_idx, unit)
        self.prompt_count.index_add_(0, prompt_idx, self.prompt_count.new_ones(unit.shape[0]))
        self.sum_norm += float(norms.sum())
        self.n += x.shape[0]

    def covariance(self) -> np.ndarray:
        """Unbiased covariance (d×d, float64 numpy) from the shifted sums."""
        mean_c = self.sum_x / self.n
        cov = (self.sum_xx - self.n * torch.outer(mean_c, mean_c)) / max(self.n - 1, 1)
        return cov.cpu().numpy()


@dataclass
class CaptureState:
    """Everything accumulated over one probe (per layer moments, MLP usage, samples, logits)."""

    layers: list[LayerMoments]
    mlp_abs_sum: list[torch.Tensor | None]
    mlp_count: list[int]
    samples: list[torch.Tensor]
    lens_entropy_sum: torch.Tensor
    lens_count: int = 0
    final_entropy_sum: float = 0.0
    final_margin_sum: float = 0.0
    final_count: int = 0


class StreamingCapture:
    """Hooks a decoder LM so each forward pass streams into :class:`CaptureState`.

    Use as a context manager; call :meth:`set_batch` before each forward with the batch's valid
    token mask, the prompt index of each row, and the (row, position) pairs to sample.
    """

    def __init__(
        self, model: nn.Module, parts: ModelParts, n_prompts: int, lens_samples: int = 64
    ) -> None:
        self.model = model
        self.parts = parts
        self.lens_samples = lens_samples
        n_blocks = len(parts.blocks)
        device = next(model.parameters()).device
        d = model.config.hidden_size if hasattr(model.config, "hidden_size") else None
        d = d or model.config.n_embd
        self.state = CaptureState(
            layers=[LayerMoments(d, n_prompts, device) for _ in range(n_blocks + 1)],
            mlp_abs_sum=[None] * (n_blocks + 1),
            mlp_count=[0] * (n_blocks + 1),
            samples=[[] for _ in range(n_blocks + 1)],
            lens_entropy_sum=torch.zeros(n_blocks + 1, dtype=torch.float64, device=device),
        )
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mask: torch.Tensor | None = None
        self._row_prompt: torch.Tensor | None = None
        self._sample_rows: torch.Tensor | None = None
        self._sample_pos: torch.Tensor | None = None
        self._lens_seen = 0

    def __enter__(self) -> StreamingCapture:
        blocks = self.parts.blocks
        self._handles.append(
            blocks[0].register_forward_pre_hook(self._embedding_hook, with_kwargs=True)
        )
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_hook(self._make_block_hook(i + 1)))
            proj = self.parts.mlp_out[i]
            if proj is not None:
                self._handles.append(proj.register_forward_pre_hook(self._make_mlp_hook(i + 1)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def set_batch(
        self,
        valid_mask: torch.Tensor,
        row_prompt: torch.Tensor,
        sample_rows: torch.Tensor,
        sample_pos: torch.Tensor,
    ) -> None:
        """Declare the next batch: valid tokens (B×T bool), prompt id per row, sampled tokens."""
        self._mask = valid_mask
        self._row_prompt = row_prompt
        self._sample_rows = sample_rows
        self._sample_pos = sample_pos

    # -- hooks -------------------------------------------------------------------------------
    def _embedding_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        self._consume(0, hidden)

    def _make_block_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self._consume(layer, hidden)

        return hook

    def _make_mlp_hook(self, layer: int):
        def hook(module: nn.Module, args: tuple) -> None:
            acts = args[0]
            valid = acts[self._mask]
            total = valid.float().abs().sum(0).double()
            state = self.state
            state.mlp_abs_sum[layer] = (
                total if state.mlp_abs_sum[layer] is None else state.mlp_abs_sum[layer] + total
            )
            state.mlp_count[layer] += valid.shape[0]

        return hook

    @torch.no_grad()
    def _consume(self, layer: int, hidden: torch.Tensor) -> None:
        mask = self._mask
        tokens = hidden[mask]
        prompt_of_token = self._row_prompt[:, None].expand_as(mask)[mask]
        self.state.layers[layer].add(tokens, prompt_of_token)
        if self._sample_rows.numel():
            sampled = hidden[self._sample_rows, self._sample_pos].float()
            self.state.samples[layer].append(sampled.cpu())
            budget = self.lens_samples - self._lens_seen
            if budget > 0:
                lens = sampled[:budget]
                self.state.lens_entropy_sum[layer] += self._lens_entropy(lens).sum()
                if layer == len(self.state.layers) - 1:
                    self._lens_seen += lens.shape[0]
                    self.state.lens_count += lens.shape[0]

    def _lens_entropy(self, hidden: torch.Tensor) -> torch.Tensor:
        """Entropy of softmax(W_U · norm(h)) — the logit lens (nostalgebraist 2020) with the
        model's final norm applied, as the real output head sees it."""
        weight = self.parts.lm_head.weight
        normed = self.parts.final_norm(hidden.to(weight.dtype)) if self.parts.final_norm else hidden
        logits = (normed @ weight.T).float()
        logp = torch.log_softmax(logits, dim=-1)
        return -(logp.exp() * logp).sum(-1).double()

    @torch.no_grad()
    def consume_logits(self, logits: torch.Tensor, chunk: int = 64) -> None:
        """Next-token entropy and top-1 probability margin of the model's real output.

        Processed in chunks of ``chunk`` tokens so the extra memory stays ~2 × chunk × vocab
        floats instead of several copies of the whole (batch × seq × vocab) logits.
        """
        flat = logits.reshape(-1, logits.shape[-1])
        rows = self._mask.reshape(-1).nonzero().squeeze(1)
        for start in range(0, rows.numel(), chunk):
            block = flat[rows[start : start + chunk]].float()
            lse = torch.logsumexp(block, dim=-1)
            entropy = lse - (torch.softmax(block, dim=-1) * block).sum(-1)
            top2 = block.topk(2, dim=-1).values
            margin = torch.exp(top2[:, 0] - lse) - torch.exp(top2[:, 1] - lse)
            self.state.final_entropy_sum += float(entropy.sum())
            self.state.final_margin_sum += float(margin.sum())
            self.state.final_count += block.shape[0]
