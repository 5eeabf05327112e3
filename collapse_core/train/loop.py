"""One readable training loop for every post-training stage (nanoGPT style, no HF Trainer).

::

    method "lora": model ──get_peft_model(LoRA r, α on target modules)──► AdamW on LoRA params
    method "full": model (every parameter, fp32 master weights)          ──► AdamW on all params
    for step in 1..steps:
        batch  = next shuffled slice of the examples        (hooks.batch_mixer may swap items)
        loss   = objective(batch)                           (SFT: response-only CE; DPO: Rafailov)
        loss  += hooks.extra_loss(model, batch, outputs)    (regularisers, e.g. O-LoRA, VICReg)
        backward, clip ‖g‖ ≤ grad_clip, AdamW step with warmup + cosine learning rate
        hooks.after_step(model, step)                       (e.g. feature refresh)

The two methods differ only in their set-up (:func:`_setup_lora`, :func:`_setup_full`: what is
trained, the DPO reference, ΔW and the undo); schedule, clipping, batching and seeding are shared.

Determinism: LoRA initialisation, shuffling, dropout and any hook randomness run under
``torch.manual_seed(cfg.seed)`` inside ``torch.random.fork_rng`` (the caller's RNG state is left
as it was) and the example order comes from ``numpy.random.default_rng(cfg.seed)``; the same
seed on the same device gives the same losses.

DPO reference model = the stage's starting checkpoint: with LoRA obtained for free by running
the same network under ``peft_model.disable_adapter()`` (no second copy in memory); with full FT
a frozen copy of the starting weights (:func:`collapse_core.train.full.frozen_copy`). Examples
without a preference pair inside a DPO batch (e.g. replayed ones) get the SFT loss instead; the
batch loss is the example-weighted mean of the two (n_pairs · DPO + n_sft · SFT) / (n_pairs +
n_sft).
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal

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
    """Hyper-parameters of one training stage.

    ``method`` picks what is trained: ``"lora"`` (a fresh LoRA adapter of rank ``lora_r`` and
    scale ``lora_alpha`` on ``target_modules``) or ``"full"`` (every parameter; ``lora_*`` then
    only set the rank of the update subspaces compared across stages and ``target_modules``
    the weights whose update ΔW is measured, see :mod:`collapse_core.train.full`).

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
    method: Literal["lora", "full"] = "lora"


@dataclass
class TrainSection(TrainConfig):
    """The ``[train]`` table of a run config: :class:`TrainConfig`'s fields plus ``n_train``
    (training examples per stage). ``seed`` is not set by the file: every stage derives its own
    from the run seed (:meth:`stage_config`)."""

    n_train: int = 200

    CONFIG_KEYS: ClassVar[tuple[str, ...]] = (
        "method", "steps", "batch_size", "lr", "lora_r", "lora_alpha", "target_modules",
        "max_length", "n_train", "dpo_beta",
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
    """What a stage produced. ``losses`` are the objective per step (without extra terms).

    ``peft_model`` is the trained model: the PEFT wrapper with the adapter for LoRA, the caller's
    model itself (trained in place) for full fine-tuning. ``deltas`` = ``{module: ΔW}`` (float32,
    out × in) of the target modules: (α/r) B A for LoRA, W_after − W_before for full FT.
    """

    losses: list[float]
    seconds: float
    tokens: int
    peft_model: nn.Module
    stopped: bool = False
    extra_losses: list[float] = field(default_factory=list)
    target_modules: tuple[str, ...] = ()
    method: str = "lora"
    deltas: dict[str, np.ndarray] = field(default_factory=dict)


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
    trainee: _Trainee,
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
        logp, count, outputs = model_response_logprobs(trainee.model, batch, hidden)
    n_pairs, n_single = len(pairs), len(singles)
    loss = logp.new_zeros((), dtype=torch.float32)
    if n_pairs:
        ref_logp = trainee.reference({k: v[: 2 * n_pairs] for k, v in batch.items()})
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


@dataclass
class _Trainee:
    """One method's set-up of a stage (:func:`_setup_lora`, :func:`_setup_full`)."""

    model: nn.Module  # what the forward runs through and the result returns
    params: list[nn.Parameter]  # what AdamW updates
    reference: Callable[[Batch], torch.Tensor]  # DPO reference log-probs, without grad
    deltas: Callable[[], dict[str, np.ndarray]]  # ΔW per target module, after training
    undo: Callable[[], None]  # on failure: the caller's model as it was
    targets: tuple[str, ...]


def _restore_flags(model: nn.Module, grads: dict[str, bool]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(grads.get(name, param.requires_grad))


def _setup_lora(model: nn.Module, cfg: TrainConfig, device: torch.device) -> _Trainee:
    """Wrap ``model`` with a fresh LoRA adapter; reference = the same network, adapter off."""
    from peft import get_peft_model

    from .lora import delta_arrays, lora_deltas

    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    lora_config = make_lora_config(model, cfg)
    with warnings.catch_warnings():  # peft 0.21 calls a name transformers 5 deprecated
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        peft_model = get_peft_model(model, lora_config)

    def reference(batch: Batch) -> torch.Tensor:
        # The starting weights (adapter off), without dropout: no second copy in memory.
        with (eval_mode(peft_model), torch.no_grad(), peft_model.disable_adapter(),
              autocast_context(device)):  # fmt: skip
            return model_response_logprobs(peft_model, batch)[0]

    def undo() -> None:
        peft_model.unload()  # drop the adapter
        _restore_flags(model, grads)

    return _Trainee(
        model=peft_model,
        params=[p for p in peft_model.parameters() if p.requires_grad],
        reference=reference,
        deltas=lambda: delta_arrays(lora_deltas(peft_model)),
        undo=undo,
        targets=tuple(sorted(lora_config.target_modules)),
    )


def _setup_full(model: nn.Module, cfg: TrainConfig, device: torch.device) -> _Trainee:
    """Make every parameter of ``model`` trainable, in float32; a frozen copy of the starting
    weights is the DPO reference, the undo and the start of ΔW (:mod:`.full`)."""
    from .full import frozen_copy, restore_weights, weight_deltas

    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    targets = resolve_target_modules(model, cfg.target_modules)
    start = frozen_copy(model)
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        # fp32 master weights: in bf16 an AdamW step of lr ≈ 3e-5 is below half an ulp of most
        # weights and rounds away. The forward still runs under bf16 autocast on CUDA.
        model.float()
    model.requires_grad_(True)

    def reference(batch: Batch) -> torch.Tensor:
        with torch.no_grad(), autocast_context(device):
            return model_response_logprobs(start, batch)[0]

    def undo() -> None:
        restore_weights(model, start)
        model.to(dtype)
        _restore_flags(model, grads)

    return _Trainee(
        model=model,
        params=list(model.parameters()),  # a tied embedding/LM head is listed once
        reference=reference,
        deltas=lambda: weight_deltas(start, model, targets),
        undo=undo,
        targets=tuple(sorted(targets)),
    )


SETUPS: dict[str, Callable[[nn.Module, TrainConfig, torch.device], _Trainee]] = {
    "lora": _setup_lora,
    "full": _setup_full,
}


def _check_inputs(model: nn.Module, examples: list[Any], objective: str, cfg: TrainConfig) -> str:
    """The canonical objective (``sft``/``dpo``), or a CollapseError for unusable inputs."""
    from peft import PeftModel

    if objective not in OBJECTIVES:
        raise CollapseError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if cfg.method not in SETUPS:
        raise CollapseError(f"unknown training method {cfg.method!r}; valid: {', '.join(SETUPS)}")
    if not examples:
        raise CollapseError("no training examples for this stage")
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise CollapseError(f"steps and batch_size must be ≥ 1, got {cfg.steps}, {cfg.batch_size}")
    if isinstance(model, PeftModel):
        raise CollapseError("model already has a LoRA adapter; merge_and_unload it first")
    if OBJECTIVES[objective] == "dpo" and not any(_is_pair(e) for e in examples):
        raise CollapseError("DPO needs examples with both chosen and rejected responses")
    return OBJECTIVES[objective]


@dataclass
class _Progress:
    """What the step loop accumulates."""

    losses: list[float] = field(default_factory=list)
    extras: list[float] = field(default_factory=list)
    tokens: int = 0
    stopped: bool = False


def _run_steps(
    trainee: _Trainee,
    tokenizer: Any,
    examples: list[Any],
    objective: str,
    cfg: TrainConfig,
    hooks: TrainHooks,
    report: Callable[[int, float], None],
    should_stop: Callable[[], bool] | None,
) -> _Progress:
    """The optimisation loop of the module docstring, on ``trainee.params``."""
    device = model_device(trainee.model)
    fmt, pad, done = _Formatter(tokenizer, cfg.max_length), pad_id(tokenizer), _Progress()
    optimizer = torch.optim.AdamW(trainee.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    order = batch_order(len(examples), cfg.batch_size, np.random.default_rng(cfg.seed))
    try:
        for step in range(cfg.steps):
            if should_stop is not None and should_stop():
                done.stopped = True
                break
            between_batches("training", step, cfg.steps)
            batch_examples = [examples[i] for i in next(order)]
            if hooks.batch_mixer is not None:
                batch_examples = list(hooks.batch_mixer(step, batch_examples))
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            loss, batch, outputs = _step_loss(
                trainee, batch_examples, objective, fmt, cfg, pad, device, hooks.needs_hidden_states
            )
            value = float(loss.detach())
            if not math.isfinite(value):
                raise CollapseError(
                    f"training diverged at step {step + 1} (loss {value}); lower the lr"
                )
            total = loss
            if hooks.extra_loss is not None:
                extra = hooks.extra_loss(trainee.model, batch, outputs)
                if extra is not None:
                    total = total + extra
                    done.extras.append(float(extra.detach()))
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            if cfg.grad_clip and cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(trainee.params, cfg.grad_clip)
            optimizer.step()
            del outputs, total
            done.losses.append(value)
            done.tokens += int(batch["attention_mask"].sum())
            if hooks.after_step is not None:
                hooks.after_step(trainee.model, step + 1)
            report(step + 1, value)
    finally:
        optimizer.zero_grad(set_to_none=True)
    return done


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
    """Train ``model`` for ``cfg.steps`` steps of ``objective`` with ``cfg.method``.

    ``method="lora"``: a fresh LoRA adapter; ``model`` is wrapped in place by
    ``peft.get_peft_model`` (its base weights are never changed; PEFT sets their
    ``requires_grad`` to False). ``method="full"``: every parameter of ``model`` is trained in
    place (in float32). ``objective`` is ``"sft"`` (response-only cross-entropy), ``"dpo"``
    (Rafailov et al. 2023, reference = the starting weights: the adapter disabled, or a frozen
    copy for full FT) or a stage name mapped by :data:`OBJECTIVES`. Training runs on the model's
    device, with bf16 autocast on CUDA. ``progress(step, total, loss)`` replaces the tqdm bar;
    ``should_stop()`` is polled before every step and ends training early with
    ``stopped=True``. On an exception the caller's model is left as it was (adapter removed, or
    starting weights restored). Returns losses per step, wall seconds, input tokens processed
    (non-pad tokens of the policy forwards), the trained model and ΔW (:class:`TrainResult`).
    """
    examples = list(examples)
    objective = _check_inputs(model, examples, objective, cfg)
    hooks = hooks or TrainHooks()
    device = model_device(model)
    was_training = model.training
    rng_devices = [device.index or 0] if device.type == "cuda" else []
    started = time.perf_counter()
    bar = None
    if progress is None:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc=f"train {objective}", leave=False)

    def report(step: int, value: float) -> None:
        if progress is not None:
            progress(step, cfg.steps, value)
        else:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}")

    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(cfg.seed)
        trainee = SETUPS[cfg.method](model, cfg, device)
        trainee.model.train()
        try:
            done = _run_steps(trainee, tokenizer, examples, objective, cfg, hooks, report,
                              should_stop)  # fmt: skip
        except BaseException:
            trainee.undo()
            raise
        finally:
            if bar is not None:
                bar.close()
            trainee.model.train(was_training)
    return TrainResult(
        losses=done.losses,
        seconds=time.perf_counter() - started,
        tokens=done.tokens,
        peft_model=trainee.model,
        stopped=done.stopped,
        extra_losses=done.extras,
        target_modules=trainee.targets,
        method=cfg.method,
        deltas=trainee.deltas(),
    )
