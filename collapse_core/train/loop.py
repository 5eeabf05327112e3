"""One readable LoRA training loop for every post-training stage (nanoGPT style, no HF Trainer).

::

    model ──get_peft_model(LoRA r, α on target modules)──► AdamW on the LoRA parameters
    for step in 1..steps:
        batch  = next shuffled slice of the examples        (hooks.batch_mixer may swap items)
        loss   = objective(batch)                           (SFT: response-only CE; DPO: Rafailov)
        loss  += hooks.extra_loss(model, batch, outputs)    (regularisers, e.g. O-LoRA, VICReg)
        backward, clip ‖g‖ ≤ grad_clip, AdamW step with warmup + cosine learning rate
        hooks.after_step(model, step)                       (e.g. feature refresh)

Determinism: LoRA initialisation, shuffling, dropout and any hook randomness run under
``torch.manual_seed(cfg.seed)`` inside ``torch.random.fork_rng`` (the caller's RNG state is left
as it was) and the example order comes from ``numpy.random.default_rng(cfg.seed)``; the same
seed on the same device gives the same losses.

DPO reference model = the stage's starting checkpoint, obtained for free by running the same
network under ``peft_model.disable_adapter()`` (no second copy in memory). Examples without a
preference pair inside a DPO batch (e.g. replayed ones) get the SFT loss instead; the batch loss
is the example-weighted mean of the two (n_pairs · DPO + n_sft · SFT) / (n_pairs + n_sft).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..devices import autocast_context, eval_mode, model_device
from ..errors import CollapseError
from ..monitor import between_batches
from ..names import STAGE_OBJECTIVES
from ..sections import Range
from .objectives import Batch, collate, dpo_loss, format_example, model_response_logprobs, pad_id

__all__ = [
    "DEFAULT_TARGET_MODULES",
    "OBJECTIVES",
    "TrainConfig",
    "TrainHooks",
    "TrainResult",
    "batch_order",
    "lr_at",
    "make_lora_config",
    "resolve_target_modules",
    "train_stage",
]

#: Stage name → objective (the stages' own map, plus the plasticity probe task, which is SFT).
OBJECTIVES = {**STAGE_OBJECTIVES, "plasticity": "sft"}
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
#: Attention projections to use instead of q/v for architectures that fuse them.
ARCH_TARGET_MODULES = {
    "gpt2": ("c_attn",),
    "gpt_neox": ("query_key_value",),
    "falcon": ("query_key_value",),
    "bloom": ("query_key_value",),
    "phi3": ("qkv_proj",),
    "mpt": ("Wqkv",),
}


@dataclass
class TrainConfig:
    """Hyper-parameters of one LoRA stage.

    The learning rate warms up linearly over ``warmup_steps`` to ``lr`` and then follows a cosine
    decay to ``min_lr_ratio · lr`` at the last step (``min_lr_ratio=1`` keeps it constant).
    ``target_modules=("q_proj", "v_proj")`` (the default) is mapped to the fused attention
    projection on architectures that have no q/v projections (GPT-2: ``c_attn``).
    """

    steps: int = 30
    batch_size: int = 4
    lr: float = 2e-4
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = DEFAULT_TARGET_MODULES
    max_length: int = 128
    seed: int = 0
    dpo_beta: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0


@dataclass
class TrainSection(TrainConfig):
    """The ``[train]`` table of a run config: :class:`TrainConfig`'s fields plus ``n_train``
    (training examples per stage). ``seed`` is not set by the file: every stage derives its own
    from the run seed (:meth:`stage_config`)."""

    n_train: int = 200

    CONFIG_KEYS: ClassVar[tuple[str, ...]] = (
        "steps", "batch_size", "lr", "lora_r", "lora_alpha", "target_modules", "max_length",
        "n_train", "dpo_beta",
    )  # fmt: skip
    LIMITS: ClassVar[dict[str, Range]] = {
        "steps": Range(1, 100_000), "batch_size": Range(1, 4096),
        "lr": Range(0, 1, lo_open=True, hi_open=True), "lora_r": Range(1, 1024),
        "lora_alpha": Range(1, 65_536), "max_length": Range(8, 32_768),
        "n_train": Range(1, 1_000_000), "dpo_beta": Range(0, 100, lo_open=True),
    }  # fmt: skip
    NON_EMPTY: ClassVar[tuple[str, ...]] = ("target_modules",)

    def stage_config(self, seed: int, **changes: Any) -> TrainConfig:
        """A plain :class:`TrainConfig` with these settings, ``seed`` and any ``changes``."""
        values = {f.name: getattr(self, f.name) for f in fields(TrainConfig)}
        return TrainConfig(**{**values, "seed": seed, **changes})


@dataclass
class TrainHooks:
    """Extension points for interventions; every field is optional.

    - ``batch_mixer(step, examples) -> examples``: change the examples of a step (replay).
    - ``extra_loss(model, batch, outputs) -> Tensor | None``: a term added to the objective.
      ``batch`` is the collated dict (``input_ids``, ``attention_mask``, ``labels``; for DPO the
      rows are [chosen…, rejected…, sft…]); ``outputs`` is the policy forward's output, with
      ``hidden_states`` only when ``needs_hidden_states`` is True. It has no ``logits`` for the
      architectures whose head runs on response positions only (see
      :func:`~collapse_core.train.objectives.model_response_logprobs`).
    - ``after_step(model, step)``: called after every optimiser step (1-based ``step``).
    """

    batch_mixer: Callable[[int, list[Any]], list[Any]] | None = None
    extra_loss: Callable[[nn.Module, Batch, Any], torch.Tensor | None] | None = None
    after_step: Callable[[nn.Module, int], None] | None = None
    needs_hidden_states: bool = False


@dataclass
class TrainResult:
    """What a stage produced. ``losses`` are the objective per step (without extra terms)."""

    losses: list[float]
    seconds: float
    tokens: int
    peft_model: nn.Module
    stopped: bool = False
    extra_losses: list[float] = field(default_factory=list)
    target_modules: tuple[str, ...] = ()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of 0-based ``step``: linear warmup, then cosine to ``min_lr_ratio · lr``."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps - 1)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))


def _adaptable_leaf_names(model: nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name
    }


def resolve_target_modules(
    model: nn.Module, requested: Sequence[str] | None = DEFAULT_TARGET_MODULES
) -> tuple[str, ...]:
    """The LoRA target module names for ``model``.

    ``requested`` is used when every name exists as a Linear/Conv1D leaf; the default q/v pair
    (or None) falls back to the architecture's fused projection (``ARCH_TARGET_MODULES``).
    Raises :class:`CollapseError` naming the available layers otherwise.
    """
    names = _adaptable_leaf_names(model)
    wanted = tuple(requested) if requested else DEFAULT_TARGET_MODULES
    if all(t in names for t in wanted):
        return wanted
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if wanted == DEFAULT_TARGET_MODULES and model_type in ARCH_TARGET_MODULES:
        fallback = ARCH_TARGET_MODULES[model_type]
        if all(t in names for t in fallback):
            return fallback
    missing = [t for t in wanted if t not in names]
    raise CollapseError(
        f"LoRA target modules {missing} not found in this model; "
        f"available linear layers: {', '.join(sorted(names))}"
    )


def make_lora_config(model: nn.Module, cfg: TrainConfig) -> Any:
    """A ``peft.LoraConfig`` for causal-LM training with the resolved target modules."""
    from peft import LoraConfig
    from transformers.pytorch_utils import Conv1D

    targets = resolve_target_modules(model, cfg.target_modules)
    conv1d = any(
        isinstance(m, Conv1D) and n.rsplit(".", 1)[-1] in targets for n, m in model.named_modules()
    )
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(targets),
        fan_in_fan_out=conv1d,
        bias="none",
        task_type="CAUSAL_LM",
    )


def batch_order(n: int, batch_size: int, rng: np.random.Generator) -> Iterator[list[int]]:
    """Endless index batches of ``train_stage``: a fresh permutation per epoch, wrapping across
    epoch ends (``rng = numpy.random.default_rng(cfg.seed)`` there)."""
    queue: list[int] = []
    while True:
        while len(queue) < batch_size:
            queue.extend(rng.permutation(n).tolist())
        yield queue[:batch_size]
        queue = queue[batch_size:]


def _target(ex: Any) -> str | None:
    response = getattr(ex, "response", None)
    return response if response is not None else getattr(ex, "chosen", None)


def _is_pair(ex: Any) -> bool:
    return getattr(ex, "chosen", None) is not None and getattr(ex, "rejected", None) is not None


class _Formatter:
    """Cached :func:`format_example` for one tokenizer and max_length."""

    def __init__(self, tokenizer: Any, max_length: int) -> None:
        self.tokenizer, self.max_length = tokenizer, max_length
        self.cache: dict[tuple[str, str], dict[str, list[int]]] = {}

    def __call__(self, prompt: str, response: str) -> dict[str, list[int]]:
        key = (prompt, response)
        if key not in self.cache:
            self.cache[key] = format_example(self.tokenizer, prompt, response, self.max_length)
        return self.cache[key]


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def _step_loss(
    peft_model: nn.Module,
    examples: list[Any],
    objective: str,
    fmt: _Formatter,
    cfg: TrainConfig,
    pad: int,
    device: torch.device,
    hidden: bool,
) -> tuple[torch.Tensor, Batch, Any]:
    """Objective of one batch: (loss, collated batch, policy forward outputs)."""
    pairs = [e for e in examples if _is_pair(e)] if objective == "dpo" else []
    singles = [e for e in examples if not (objective == "dpo" and _is_pair(e))]
    feats = [fmt(e.prompt, e.chosen) for e in pairs] + [fmt(e.prompt, e.rejected) for e in pairs]
    for ex in singles:
        target = _target(ex)
        if target is None:
            raise CollapseError("a training example has neither a response nor a chosen answer")
        feats.append(fmt(ex.prompt, target))
    batch = _to(collate(feats, pad), device)
    with autocast_context(device):
        logp, count, outputs = model_response_logprobs(peft_model, batch, hidden)
    n_pairs, n_single = len(pairs), len(singles)
    loss = logp.new_zeros((), dtype=torch.float32)
    if n_pairs:
        ref_batch = {k: v[: 2 * n_pairs] for k, v in batch.items()}
        # Reference log-probs: the starting weights (adapter off), without dropout.
        with (
            eval_mode(peft_model),
            torch.no_grad(),
            peft_model.disable_adapter(),
            autocast_context(device),
        ):
            ref_logp, _, _ = model_response_logprobs(peft_model, ref_batch)
        pair_loss = dpo_loss(
            logp[:n_pairs],
            logp[n_pairs : 2 * n_pairs],
            ref_logp[:n_pairs],
            ref_logp[n_pairs:],
            beta=cfg.dpo_beta,
        )
        loss = loss + pair_loss * n_pairs
    if n_single:
        sl = slice(2 * n_pairs, None)
        single_loss = -logp[sl].sum() / count[sl].sum().clamp(min=1)
        loss = loss + single_loss * n_single
    return loss / (n_pairs + n_single), batch, outputs


def train_stage(
    model: nn.Module,
    tokenizer: Any,
    examples: Sequence[Any],
    objective: str,
    cfg: TrainConfig,
    hooks: TrainHooks | None = None,
    progress: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a fresh LoRA adapter on ``model`` for ``cfg.steps`` steps of ``objective``.

    ``objective`` is ``"sft"`` (response-only cross-entropy), ``"dpo"`` (Rafailov et al. 2023,
    reference = the starting weights via ``disable_adapter``) or a stage name mapped by
    :data:`OBJECTIVES`. ``model`` is wrapped in place by ``peft.get_peft_model`` (its base
    weights are never changed by training; PEFT sets their ``requires_grad`` to False) and is
    trained on its current device, with bf16 autocast on CUDA. ``progress(step, total, loss)``
    replaces the tqdm bar; ``should_stop()`` is polled before every step and ends training early
    with ``stopped=True``. Returns losses per step, wall seconds, input tokens processed (non-pad
    tokens of the policy forwards) and the PEFT model (see :mod:`collapse_core.train.lora`).
    """
    from peft import PeftModel, get_peft_model

    if objective not in OBJECTIVES:
        raise CollapseError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    objective = OBJECTIVES[objective]
    examples = list(examples)
    if not examples:
        raise CollapseError("no training examples for this stage")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise CollapseError(f"steps and batch_size must be ≥ 1, got {cfg.steps}, {cfg.batch_size}")
    if isinstance(model, PeftModel):
        raise CollapseError("model already has a LoRA adapter; merge_and_unload it first")
    if objective == "dpo" and not any(_is_pair(e) for e in examples):
        raise CollapseError("DPO needs examples with both chosen and rejected responses")
    hooks = hooks or TrainHooks()
    device = model_device(model)
    fmt = _Formatter(tokenizer, cfg.max_length)
    pad = pad_id(tokenizer)
    was_training = model.training
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    losses: list[float] = []
    extras: list[float] = []
    tokens = 0
    stopped = False
    started = time.perf_counter()
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(cfg.seed)
        lora_config = make_lora_config(model, cfg)
        with warnings.catch_warnings():  # peft 0.21 calls a name transformers 5 deprecated
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            peft_model = get_peft_model(model, lora_config)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        order = batch_order(len(examples), cfg.batch_size, np.random.default_rng(cfg.seed))
        bar = None
        if progress is None:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, desc=f"train {objective}", leave=False)
        peft_model.train()
        try:
            for step in range(cfg.steps):
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                between_batches("training", step, cfg.steps)
                batch_examples = [examples[i] for i in next(order)]
                if hooks.batch_mixer is not None:
                    batch_examples = list(hooks.batch_mixer(step, batch_examples))
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg)
                loss, batch, outputs = _step_loss(
                    peft_model, batch_examples, objective, fmt, cfg, pad, device,
                    hooks.needs_hidden_states,
                )  # fmt: skip
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise CollapseError(
                        f"training diverged at step {step + 1} (loss {value}); lower the lr"
                    )
                total = loss
                if hooks.extra_loss is not None:
                    extra = hooks.extra_loss(peft_model, batch, outputs)
                    if extra is not None:
                        total = total + extra
                        extras.append(float(extra.detach()))
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if cfg.grad_clip and cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                del outputs, total
                losses.append(value)
                tokens += int(batch["attention_mask"].sum())
                if hooks.after_step is not None:
                    hooks.after_step(peft_model, step + 1)
                if progress is not None:
                    progress(step + 1, cfg.steps, value)
                else:
                    bar.update(1)
                    bar.set_postfix(loss=f"{value:.3f}")
        except BaseException:
            # Leave the caller's model as it was: drop the adapter, restore the flags.
            peft_model.unload()
            for name, param in model.named_parameters():
                param.requires_grad_(grads.get(name, param.requires_grad))
            raise
        finally:
            if bar is not None:
                bar.close()
            optimizer.zero_grad(set_to_none=True)
            peft_model.train(was_training)
    return TrainResult(
        losses=losses,
        seconds=time.perf_counter() - started,
        tokens=tokens,
        peft_model=peft_model,
        stopped=stopped,
        extra_losses=extras,
        target_modules=tuple(sorted(lora_config.target_modules)),
    )
