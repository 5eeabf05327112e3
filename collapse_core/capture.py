"""Streaming capture of hidden states: one forward pass per batch, O(layers·d²) memory.

For every layer ℓ (0 = token embeddings, ℓ = output of block ℓ, before the final norm) and every
batch we add the valid (non-padding) token vectors into running sums instead of keeping them. All
sums are stacked over layers (one tensor per kind, first axis = layer):

- shifted moments Σ(x−c) and Σ(x−c)(x−c)ᵀ with c = the first batch's mean (shifted-data
  algorithm, Chan, Golub & LeVeque 1983: avoids the catastrophic cancellation of Σxxᵀ − Nμμᵀ when
  hidden states carry huge mean components, as LLM residual streams do). Only the lower
  triangle of Σ(x−c)(x−c)ᵀ is accumulated, as three in-place float32 ``addmm_`` blocks per
  layer per batch (:func:`_add_lower_gram_`: 3/4 of the full product's flops, same sums).
  BLAS ``ssyrk`` would halve the flops, but OpenBLAS's syrk rounds differently with each thread
  count: a Ray worker at 1 thread and a local run at 2 then store effective ranks 7e-5 apart on
  near-singular layers, and the executors must agree; GEMM blocks do not. Once the
  mean is shifted out, float32 keeps the covariance to ~1e-6 relative (checked against float64
  on full hidden states of SmolLM2 by ``tests/test_probe.py``), at half the memory of a float64
  accumulator;
- Σ x̂ of unit vectors per prompt, as one (prompts × tokens) @ (tokens × d) product, whose sum
  over prompts is the overall Σ x̂ (streaming anisotropy and homogeneity);
- Σ|h_i| of every MLP unit (input of the MLP's output projection) for dormant units;
- the fixed-seed token subsample itself (stored for TwoNN, CKA, UMAP), written in place into one
  (layers × samples × d) buffer;
- fingerprints of the distinct token vectors of layer 0, until there are more than d of them:
  token embeddings repeat with their tokens, so that layer's covariance has rank ≤ (distinct
  rows − 1), often below n − 1 and d (the default `math` probe set: 425 distinct tokens).
  :meth:`CaptureState.rank_bound` hands the bound to the spectrum, which zeroes the float32
  rounding noise of the null space (it had moved layer 0's effective rank by 1.6e-3 there).

The model's output head (final norm + LM head) runs only where the probe reads it: on the
fixed-seed token subsample, once after the last batch. The forward passes skip the head
(``logits_to_keep=1``, so HF computes one position's logits per row instead of every position's:
on SmolLM2 the 49k-vocab head is ~15-20 % of a forward). The next-token entropy and top-1 margin
are means over the subsample's tokens, computed from the last block's sampled states exactly as
the model's forward computes its logits (:meth:`StreamingCapture.output_logits`), and kept per
token (``final_entropy``, ``final_margin``). The logit lens (the same head on every layer) uses
the ``lens_samples`` tokens of the subsample picked across all prompts: the sampled rows of
every layer but the last are stacked and go through the head, so its work is sized to its
sample, not to the batches. The head's logits are never held vocabulary-wide: they are made one
(vocabulary block × rows) tile at a time and reduced by an online softmax
(:func:`_softmax_stats`); the last layer's lens *is* the model's output, so its
entropies are those of the subsample at those tokens. The hooks do their work as each block
finishes, so at most one layer's activations of one batch exist beyond what the forward pass
itself holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .lens import LensDesign, lens_estimate, proxy_vocab
from .models import ModelParts

# Bumped whenever what the capture accumulates changes (part of every probe's cache key).
# 3: logit-lens tokens spread over all prompts; float32 shifted second moments.
# 4: next-token entropy and top-1 margin over the token subsample (the head runs only there),
#    kept per token. (The lower-triangle Gram blocks move results only by float rounding.)
# 5: the logit lens's adaptive two-phase design (lens.py): exact rows on m of the lens tokens,
#    a prefix-vocabulary proxy on 2L tokens, layers the proxy cannot help topped up.
CAPTURE_VERSION = "5"


@dataclass
class CaptureState:
    """Everything accumulated over one probe; the first axis of every stacked tensor is the layer.

    ``sum_xx`` (L×d×d, float32; read from its lower triangle, see the module docstring)
    and ``sum_x`` (L×d, float64) are sums of x − ``shift``; ``sum_unit`` (L×d) and
    ``prompt_unit`` (L×P×d) sums of x/‖x‖; ``prompt_count`` (P) tokens per prompt; ``sum_norm``
    (L) Σ‖x‖; ``mlp_abs_sum[ℓ]`` Σ|h| per MLP unit (None for layer 0); ``samples`` (L×S×d) the
    subsampled token vectors in the order of the sample list; ``final_entropy`` /
    ``final_margin`` (S, float64) the model's next-token entropy and p₁ − p₂ at each of them;
    ``lens_exact`` / ``lens_proxy`` (L × S, float64, NaN where not computed) the logit-lens
    entropy and its proxy at the rows of :class:`~collapse_core.lens.LensDesign` (no proxy on a
    topped-up layer, the last layer, or an exact-lens design; ``lens_proxy`` None then).
    """

    n_tokens: int
    shift: torch.Tensor
    sum_x: torch.Tensor
    sum_xx: torch.Tensor
    sum_unit: torch.Tensor
    prompt_unit: torch.Tensor
    prompt_count: torch.Tensor
    sum_norm: torch.Tensor
    mlp_abs_sum: list[torch.Tensor | None]
    samples: torch.Tensor
    lens_exact: torch.Tensor | None = None
    lens_proxy: torch.Tensor | None = None
    final_entropy: torch.Tensor | None = None
    final_margin: torch.Tensor | None = None
    #: Fingerprints of layer 0's distinct rows (:func:`row_fingerprints`); None once there are
    #: more than d of them, when they no longer bound the rank.
    embedding_rows: set[int] | None = field(default_factory=set)

    @classmethod
    def empty(
        cls, n_layers: int, d: int, n_prompts: int, n_samples: int, device: torch.device
    ) -> CaptureState:
        """Zeroed sums for ``n_layers`` layers of width ``d``."""
        f32 = {"dtype": torch.float32, "device": device}
        f64 = {"dtype": torch.float64, "device": device}
        return cls(
            n_tokens=0,
            shift=torch.zeros(n_layers, d, **f32),
            sum_x=torch.zeros(n_layers, d, **f64),
            sum_xx=torch.zeros(n_layers, d, d, **f32),
            sum_unit=torch.zeros(n_layers, d, **f64),
            # Per-prompt sums hold at most max_length unit vectors each: float32 is ample.
            prompt_unit=torch.zeros(n_layers, n_prompts, d, **f32),
            prompt_count=torch.zeros(n_prompts, **f64),
            sum_norm=torch.zeros(n_layers, **f64),
            mlp_abs_sum=[None] * n_layers,
            samples=torch.zeros(n_layers, n_samples, d, **f32),
        )

    @property
    def n_layers(self) -> int:
        return self.shift.shape[0]

    @property
    def lens_count(self) -> int:
        """The exact lens's token count L (0 without a lens): the last layer's lens rows."""
        return 0 if self.lens_exact is None else int(self.lens_exact[-1].isfinite().sum())

    def lens_estimates(self) -> np.ndarray | None:
        """Each layer's logit-lens entropy estimate (:func:`collapse_core.lens.lens_estimate`:
        the mean over the exact rows, or the two-phase difference estimate where the layer has
        proxy values); None without a lens."""
        if self.lens_exact is None:
            return None
        exact = self.lens_exact.cpu().numpy()
        proxy = None if self.lens_proxy is None else self.lens_proxy.cpu().numpy()
        return np.array(
            [
                lens_estimate(exact[i], None if proxy is None else proxy[i])
                for i in range(len(exact))
            ]
        )

    @property
    def layers(self) -> list[LayerMoments]:
        """Per-layer views of the stacked sums."""
        return [LayerMoments(self, layer) for layer in range(self.n_layers)]

    def covariance(self, layer: int) -> np.ndarray:
        """Unbiased covariance of ``layer`` (d×d, float64 numpy) from the shifted sums:
        C = (Σ y yᵀ − n ȳ ȳᵀ) / (n − 1) with y = x − c, Σ y yᵀ read from its lower triangle."""
        n = self.n_tokens
        cov = torch.tril(self.sum_xx[layer]).double()
        cov += torch.tril(cov, -1).T
        mean_c = self.sum_x[layer] / max(n, 1)
        # in place: the same bits as (S − n·outer) / (n − 1) in new tensors, in 2/3 of the time
        cov.sub_(torch.outer(mean_c, mean_c).mul_(n)).div_(max(n - 1, 1))
        return cov.cpu().numpy()

    def rank_bound(self, layer: int) -> int:
        """Upper bound on the rank of ``layer``'s covariance: n − 1 for n tokens, and for
        layer 0 (distinct rows − 1) while those are counted (see :attr:`embedding_rows`)."""
        bound = max(self.n_tokens - 1, 0)
        if layer == 0 and self.embedding_rows is not None:
            bound = min(bound, max(len(self.embedding_rows) - 1, 0))
        return bound

    def finite_layers(self) -> torch.Tensor:
        """Bool per layer: every second moment is finite (NaN/Inf states poison the sums)."""
        return torch.isfinite(self.sum_xx.flatten(1)).all(1) & torch.isfinite(self.sum_x).all(1)


@dataclass(frozen=True)
class LayerMoments:
    """Read-only view of one layer of a :class:`CaptureState`."""

    state: CaptureState
    layer: int

    @property
    def n(self) -> int:
        return self.state.n_tokens

    @property
    def sum_unit(self) -> torch.Tensor:
        return self.state.sum_unit[self.layer]

    @property
    def prompt_unit(self) -> torch.Tensor:
        return self.state.prompt_unit[self.layer]

    @property
    def prompt_count(self) -> torch.Tensor:
        return self.state.prompt_count

    @property
    def sum_norm(self) -> float:
        return float(self.state.sum_norm[self.layer])

    def covariance(self) -> np.ndarray:
        """See :meth:`CaptureState.covariance`."""
        return self.state.covariance(self.layer)


def _softmax_stats(
    blocks: Iterable[torch.Tensor], with_margin: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Entropy H = −Σ p log p of p = softmax(z) per column of the logits z, streamed as
    float32 blocks of vocabulary rows (block × columns), and with ``with_margin`` the top-1
    margin p₁ − p₂; both float64, one value per column.

    The online softmax (Milakov & Gimelshein 2018), extended to the entropy: per block b,
    with its column maximum m_b, S_b = Σ exp(z − m_b) and T_b = Σ exp(z − m_b)(z − m_b);
    blocks merge at the running maximum m ← max(m, m_b) as S ← e^{m_old − m} S + e^{m_b − m} S_b
    and T ← e^{m_old − m} (T + (m_old − m) S) + e^{m_b − m} (T_b + (m_b − m) S_b). Then
    H = log S − T / S and p₁ − p₂ = (1 − exp(z₂ − m)) / S with z₂ the second-largest logit
    (m = z₁). No vocabulary-wide buffer: a block and its exp stay in cache.
    """
    m = total = tilted = second = None
    for z in blocks:
        if with_margin:  # the two largest logits of the block, merged with the running pair
            top = z.topk(min(2, z.shape[0]), dim=0).values.double()
            b1 = top[0]
            b2 = top[1] if top.shape[0] > 1 else torch.full_like(b1, -math.inf)
            if second is None:
                second = b2
            else:  # second largest of {m ≥ second} ∪ {b1 ≥ b2}
                second = torch.maximum(torch.minimum(m, b1), torch.maximum(second, b2))
        block_max = z.amax(0)
        z -= block_max
        e = z.exp()
        block_total = e.sum(0).double()
        block_tilted = torch.linalg.vecdot(e, z, dim=0).double()
        block_max = block_max.double()
        if m is None:
            m, total, tilted = block_max, block_total, block_tilted
            continue
        new = torch.maximum(m, block_max)
        old_scale, block_scale = torch.exp(m - new), torch.exp(block_max - new)
        tilted = old_scale * (tilted + (m - new) * total) + block_scale * (
            block_tilted + (block_max - new) * block_total
        )
        total = old_scale * total + block_scale * block_total
        m = new
    entropy = total.log() - tilted / total
    margin = (1 - torch.exp(second - m)) / total if with_margin else None
    return entropy, margin


_FINGERPRINT_ROWS = 2048


def row_fingerprints(x: torch.Tensor) -> torch.Tensor:
    """One int64 per row of x (rows × d, float32): Σ_j c_j · bits(x_j) mod 2⁶⁴, with bits the
    IEEE-754 pattern of each entry and c fixed random odd 64-bit integers. Integer arithmetic
    wraps exactly and does not depend on the order of the sum, so identical rows always get
    the same fingerprint, wherever they sit. Two different rows share one with probability
    ≤ 2⁻³² over the draw of c (a linear hash over Z/2⁶⁴; the worst case is rows differing only
    in sign bits, whose bit differences are multiples of 2³¹), ~2⁻⁶⁴ for typical rows; the
    capture counts at most d + 1 rows, so any collision among them has probability ≤ d²/2³³."""
    generator = torch.Generator().manual_seed(0x5EED)
    coefficients = torch.randint(-(2**62), 2**62, (x.shape[1],), generator=generator) * 2 + 1
    bits = x.contiguous().view(torch.int32).to(torch.int64)
    return (bits * coefficients.to(x.device)).sum(1)


def _add_lower_gram_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += xᵀx on the lower triangle of ``acc`` (d × d) and its diagonal blocks, from
    x (rows × d): with x = [a b] split at h = d/2, the blocks aᵀa, bᵀa and bᵀb (three GEMMs,
    3/4 of the flops of xᵀx); the upper off-diagonal block is left as it is. Each block is a
    plain GEMM over the same rows: the sums are the full product's lower triangle (bit for bit
    with MKL here) and do not depend on the BLAS thread count (``tests/test_probe.py``)."""
    h = x.shape[1] // 2
    a, b = x[:, :h], x[:, h:]
    acc[:h, :h].addmm_(a.T, a)
    acc[h:, :h].addmm_(b.T, a)
    acc[h:, h:].addmm_(b.T, b)


# The head's logits are made and reduced one (vocabulary block × hidden rows) tile at a time:
# a 2048 × 512 float32 tile (4 MB) and its exp stay in cache through the softmax passes, and
# the vocabulary-major product W[block] · Uᵀ runs the GEMM faster per row than U · Wᵀ in
# 128-row chunks (SmolLM2 on 2 AMD EPYC cores, one thread: 2368 rows of the 576 × 49,152 head
# with their entropies in 2.0–2.2 s against 3.0–3.2 s for 128-row chunks of full-vocabulary
# logits, which also held 25 MB of them).
_VOCAB_BLOCK = 2048
_HEAD_ROWS = 512
# A head that is not a plain nn.Linear (e.g. PEFT-wrapped) runs as a module on this many rows
# at a time (25 MB of SmolLM2 logits), its output then reduced in the same vocabulary blocks.
_MODULE_HEAD_ROWS = 128


class StreamingCapture:
    """Hooks a decoder LM so each forward pass streams into :class:`CaptureState`.

    Use as a context manager; call :meth:`set_batch` before each forward with the batch's valid
    token mask, its prompts' indices and the sampled tokens it holds, and :meth:`finish`
    once after the last batch. ``lens`` (rows of the sample list, see
    :func:`collapse_core.lens.lens_design`) are the logit lens's tokens; None: no lens.
    """

    def __init__(
        self,
        model: nn.Module,
        parts: ModelParts,
        n_prompts: int,
        n_samples: int,
        lens: LensDesign | None = None,
    ) -> None:
        self.model = model
        self.parts = parts
        device = next(model.parameters()).device
        d = getattr(model.config, "hidden_size", None) or model.config.n_embd
        self.state = CaptureState.empty(len(parts.blocks) + 1, d, n_prompts, n_samples, device)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        #: The forwards the probe ran (``batching.Batch``), set by ``probing.run_capture``.
        self.batches: list = []
        self._first_batch = True
        self._flat_valid: torch.Tensor | None = None
        self._prompt_of_token: torch.Tensor | None = None
        self._prompts: torch.Tensor | None = None
        self._sample_flat: torch.Tensor | None = None
        self._sample_rows: torch.Tensor | None = None
        self.lens = lens if lens is not None and lens.lens.size else None

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
        slot_prompt: torch.Tensor,
        prompts: torch.Tensor,
        sample_flat: torch.Tensor,
        sample_rows: torch.Tensor,
    ) -> None:
        """Declare the next batch.

        ``valid_mask`` (B×T bool): tokens to measure. ``slot_prompt`` (B×T): at each measured
        position, the index into ``prompts`` of the prompt it belongs to (a row may hold one
        prompt, padded, or several, packed; see :mod:`collapse_core.batching`).
        ``sample_flat``: flat indices (r·T + t) of this batch's sampled tokens, written to rows
        ``sample_rows`` (same length) of ``state.samples``. Batches may hold any prompts in any
        order, each prompt in exactly one batch.
        """
        state = self.state
        self._flat_valid = valid_mask.reshape(-1).nonzero().squeeze(1)
        owner = slot_prompt.reshape(-1).index_select(0, self._flat_valid)
        # (prompts × tokens) indicator: row i of it selects the tokens of prompt prompts[i].
        self._prompt_of_token = (
            torch.arange(prompts.numel(), device=owner.device)[:, None] == owner[None, :]
        ).float()
        self._prompts = prompts
        self._sample_flat = sample_flat
        self._sample_rows = sample_rows
        counts = torch.bincount(owner, minlength=prompts.numel())
        state.prompt_count.index_add_(0, prompts, counts.to(state.prompt_count.dtype))
        state.n_tokens += int(self._flat_valid.numel())

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
            valid = acts.reshape(-1, acts.shape[-1]).index_select(0, self._flat_valid).float()
            total = valid.abs_().sum(0).double()
            state = self.state
            if state.mlp_abs_sum[layer] is None:
                state.mlp_abs_sum[layer] = total
            else:
                state.mlp_abs_sum[layer] += total

        return hook

    @torch.no_grad()
    def _consume(self, layer: int, hidden: torch.Tensor) -> None:
        # A trainer's mixed precision (accelerate wraps model.forward in autocast) must not turn
        # the capture's own float32 products into bf16: the sums stay float32 whoever calls.
        with torch.autocast(hidden.device.type, enabled=False):
            self._consume_float32(layer, hidden)

    def _consume_float32(self, layer: int, hidden: torch.Tensor) -> None:
        state = self.state
        flat = hidden.reshape(-1, hidden.shape[-1])
        x = flat.index_select(0, self._flat_valid).float()  # a fresh copy: modified in place
        norms = torch.linalg.vector_norm(x, dim=1).clamp_min_(1e-12)
        prompt_unit = (self._prompt_of_token / norms) @ x  # Σ x/‖x‖ per prompt of the batch
        state.prompt_unit[layer].index_add_(0, self._prompts, prompt_unit)
        state.sum_unit[layer] += prompt_unit.sum(0).double()
        state.sum_norm[layer] += norms.sum().double()
        if layer == 0 and state.embedding_rows is not None:
            # in row chunks: the int64 bits are 2× the rows' size (a long GPU batch of a 7B)
            for lo in range(0, x.shape[0], _FINGERPRINT_ROWS):
                state.embedding_rows.update(
                    row_fingerprints(x[lo : lo + _FINGERPRINT_ROWS]).tolist()
                )
                if len(state.embedding_rows) > x.shape[1]:
                    state.embedding_rows = None  # rank ≤ d anyway: stop counting
                    break
        if self._first_batch:
            state.shift[layer] = x.mean(0)
        x -= state.shift[layer]
        state.sum_x[layer] += x.sum(0).double()
        _add_lower_gram_(state.sum_xx[layer], x)
        if self._sample_flat.numel():
            sampled = flat.index_select(0, self._sample_flat).to(state.samples.dtype)
            state.samples[layer].index_copy_(0, self._sample_rows, sampled)
        if layer == state.n_layers - 1:
            self._first_batch = False

    def _normed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pre-norm states (rows × d) in the head's dtype, through the model's final norm."""
        hidden = hidden.to(self.parts.lm_head.weight.dtype)
        if self.parts.final_norm is not None:
            hidden = self.parts.final_norm(hidden)
        return hidden

    def _final_transforms_(self, logits: torch.Tensor) -> torch.Tensor:
        """The final-logit transforms HF applies after the head, elementwise on float32
        logits: Cohere's scale z ← s·z, then Gemma 2's soft cap z ← c·tanh(z / c)."""
        config = self.model.config
        scale = getattr(config, "logit_scale", None)
        if scale is not None and scale != 1:
            logits *= scale
        cap = getattr(config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @torch.no_grad()
    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's output head on pre-norm states (rows × d): z = W_U · norm(h) + b, then
        the final-logit transforms HF applies after the head (Gemma 2's soft cap
        z ← c·tanh(z / c), Cohere's scale z ← s·z), as float32 (rows × vocab)."""
        return self._final_transforms_(self.parts.lm_head(self._normed(hidden)).float())

    @property
    def _plain_head(self) -> bool:
        """Whether the head is exactly ``nn.Linear``, so its weight can be multiplied block by
        block (a subclass or a PEFT wrapper may add to its output and must run as a module)."""
        return type(self.parts.lm_head) is nn.Linear

    def _logit_blocks(
        self, normed: torch.Tensor, vocab: int | None = None
    ) -> Iterator[torch.Tensor]:
        """The head's float32 logits of ``normed`` rows (rows × d, after the final norm and
        its transforms), vocabulary-major: one (``_VOCAB_BLOCK`` × rows) block at a time,
        over the first ``vocab`` ids (default: all). A plain ``nn.Linear`` head is multiplied
        block by block (W[block] · Uᵀ + b[block]); any other head module runs whole and its
        output is cut into the same blocks."""
        head = self.parts.lm_head
        if self._plain_head:
            weight, bias = head.weight, head.bias
            end = weight.shape[0] if vocab is None else min(vocab, weight.shape[0])
            columns = normed.T
            for lo in range(0, end, _VOCAB_BLOCK):
                hi = min(lo + _VOCAB_BLOCK, end)
                block = (weight[lo:hi] @ columns).float()
                if bias is not None:
                    block += bias[lo:hi, None].float()
                yield self._final_transforms_(block)
        else:
            logits = self._final_transforms_(head(normed).float()).T[:vocab]
            for lo in range(0, logits.shape[0], _VOCAB_BLOCK):
                yield logits[lo : lo + _VOCAB_BLOCK].clone()  # reduced in place

    @torch.no_grad()
    def _head_entropy(
        self, hidden: torch.Tensor, with_margin: bool, vocab: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Entropy of softmax(:meth:`output_logits`) per row of ``hidden`` and, with
        ``with_margin``, p₁ − p₂ = (1 − exp(z₂ − z₁)) / S (float64, one value per row), by
        :func:`_softmax_stats` over :meth:`_logit_blocks` of ``_HEAD_ROWS`` rows at a time:
        the extra memory is one vocabulary block of logits, never a vocabulary-wide row.
        ``vocab``: the softmax over the first ``vocab`` ids only (the lens's proxy)."""
        rows = hidden.shape[0]
        entropy = torch.empty(rows, dtype=torch.float64, device=hidden.device)
        margin = (
            torch.empty(rows, dtype=torch.float64, device=hidden.device) if with_margin else None
        )
        chunk = _HEAD_ROWS if self._plain_head else _MODULE_HEAD_ROWS
        for start in range(0, rows, chunk):
            normed = self._normed(hidden[start : start + chunk])
            ent, mar = _softmax_stats(self._logit_blocks(normed, vocab), with_margin)
            entropy[start : start + normed.shape[0]] = ent
            if margin is not None:
                margin[start : start + normed.shape[0]] = mar
        return entropy, margin

    @torch.no_grad()
    def finish(self, logit_lens: bool = True) -> None:
        """After the last batch: the model's next-token entropy and top-1 margin at every
        subsample token (:meth:`_head_entropy` of the last block's sampled states), and with
        ``logit_lens`` the entropy of softmax(W_U · norm(h)) at the lens's rows of
        ``state.samples``: the logit lens (nostalgebraist 2020) with the model's final norm
        applied, as the real output head sees it. The last layer's lens entropies are the
        subsample's own next-token entropies. Below it, :class:`~collapse_core.lens.LensDesign`:
        the exact lens rows, or the full head on its ``exact`` rows and the prefix-vocabulary
        proxy on its ``proxy`` rows at every layer, then the full head on the other lens rows
        of the layers the proxy cannot help (:meth:`~collapse_core.lens.LensDesign.topped_up`),
        whose proxy values are dropped. Rows of all layers go through the head together."""
        state = self.state
        state.final_entropy, state.final_margin = self._head_entropy(state.samples[-1], True)
        design = self.lens
        if not logit_lens or design is None:
            return
        below, device = state.samples[:-1], state.samples.device
        n_below, n_rows, d = below.shape
        exact = torch.full((n_below + 1, n_rows), math.nan, dtype=torch.float64, device=device)
        lens_rows = torch.as_tensor(design.lens, device=device)
        exact[-1, lens_rows] = state.final_entropy[lens_rows]

        def entropy_at(layers: torch.Tensor, rows: torch.Tensor, vocab: int | None = None):
            # rows first: a copy of every layer's whole subsample would be L × S × d
            hidden = below.index_select(1, rows).index_select(0, layers).reshape(-1, d)
            return self._head_entropy(hidden, False, vocab)[0].view(len(layers), len(rows))

        every = torch.arange(n_below, device=device)
        if not design.two_phase or not self._plain_head:  # a module head runs whole anyway
            exact[:-1, lens_rows] = entropy_at(every, lens_rows)
            state.lens_exact, state.lens_proxy = exact, None
            return
        exact_rows = torch.as_tensor(design.exact, device=device)
        proxy_rows = torch.as_tensor(design.proxy, device=device)
        vocab = proxy_vocab(self.parts.lm_head.weight.shape[0])
        proxy = torch.full_like(exact, math.nan)
        exact[:-1, exact_rows] = entropy_at(every, exact_rows)
        proxy[:-1, proxy_rows] = entropy_at(every, proxy_rows, vocab)
        topped = design.topped_up(
            exact[:-1, exact_rows].T.cpu().numpy(), proxy[:-1, exact_rows].T.cpu().numpy()
        )
        topped = torch.as_tensor(topped, device=device)
        if topped.numel():
            rest = torch.as_tensor(design.rest, device=device)
            exact[topped[:, None], rest] = entropy_at(topped, rest)
            proxy[topped] = math.nan
        state.lens_exact, state.lens_proxy = exact, proxy
