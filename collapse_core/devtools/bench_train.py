"""``python -m collapse_core bench train``: LoRA SFT tokens/s, our loop vs Hugging Face Trainer.

Same model weights, same formatted examples (our chat formatting, response-only labels) in the
same batches (the Trainer reads them sequentially in our loop's shuffled order), same batch
size, LoRA config (r, α, target modules), AdamW learning rate, gradient clipping at 1.0 and
number of steps; both on the same device in one process, Trainer with
dataloader_num_workers=0 and no evaluation, logging or saving.

Both are timed the same way: wall time between the ends of consecutive optimiser steps (batch
building, forward, backward, clipping and the AdamW step), via our ``progress`` callback and a
``TrainerCallback.on_step_end``; the first (warm-up) step of each run is excluded. Tokens =
non-pad input tokens of the timed steps. The trainers alternate (ours, HF, HF, ours, …) over
``--repeats`` rounds so that neither profits from running second (the very first run also pays
for one-off kernel set-up per new shape), and the best and the median run of each are reported.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from typing import Any

import numpy as np
import torch


def _examples(n: int, seed: int):
    from ..stagedata import load_stage

    return load_stage("sft", "train", n, seed=seed, source="sample" if n <= 24 else "full")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _alternating_rounds(names: list[str], repeats: int) -> list[tuple[int, str]]:
    """(round, name) pairs with the order flipped every round (A, B, B, A, A, B, …), so that
    neither variant always runs first."""
    rounds = []
    for round_index in range(max(1, repeats)):
        order = names if round_index % 2 == 0 else names[::-1]
        rounds += [(round_index, name) for name in order]
    return rounds


def _run_ours(loaded: Any, examples: list, cfg: Any) -> float:
    """Seconds of our loop's timed steps (all but the first)."""
    from ..train import train_stage

    model = copy.deepcopy(loaded.model)
    marks: list[float] = []

    def progress(step: int, total: int, loss: float) -> None:
        _sync(loaded.device)
        marks.append(time.perf_counter())

    train_stage(model, loaded.tokenizer, examples, "sft", cfg, progress=progress)
    del model
    return marks[-1] - marks[0]


def _run_hf(loaded: Any, ordered_features: list, cfg: Any, pad: int) -> float:
    """Seconds of the Trainer's timed steps, clocked like ours."""
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ..train.loop import make_lora_config
    from ..train.objectives import collate

    model = get_peft_model(copy.deepcopy(loaded.model), make_lora_config(loaded.model, cfg))
    marks: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _sync(loaded.device)
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=cfg.batch_size, max_steps=cfg.steps,
            learning_rate=cfg.lr, lr_scheduler_type="constant", logging_strategy="no",
            save_strategy="no", report_to=[], dataloader_num_workers=0, seed=cfg.seed,
            max_grad_norm=cfg.grad_clip, use_cpu=loaded.device.type == "cpu",
            bf16=loaded.device.type == "cuda", remove_unused_columns=False, disable_tqdm=True,
            train_sampling_strategy="sequential",
        )  # fmt: skip
        trainer = Trainer(
            model=model,
            args=targs,
            train_dataset=ordered_features,
            data_collator=lambda feats: collate(feats, pad),
            callbacks=[StepClock()],
        )
        trainer.train()
    del trainer, model
    return marks[-1] - marks[0]


def _bench_eval_scoring(loaded: Any, repeats: int) -> None:
    """OOD multiple-choice scoring (32 items) with the head on response positions vs all."""
    from .. import evals
    from ..stagedata import load_ood_tasks
    from ..train import objectives

    items = load_ood_tasks(32, seed=0, source="full")
    plain = objectives.PLAIN_HEAD_MODEL_TYPES
    seconds: dict[str, list[float]] = {"response positions": [], "full logits": []}
    results = {}
    try:
        for _, name in _alternating_rounds(list(seconds), repeats):
            # An empty set sends every model down the full-logits path.
            objectives.PLAIN_HEAD_MODEL_TYPES = (
                plain if name == "response positions" else (frozenset())
            )
            start = time.perf_counter()
            results[name] = evals.multiple_choice_eval(
                loaded.model, loaded.tokenizer, items, batch_size=8
            )
            seconds[name].append(time.perf_counter() - start)
    finally:
        objectives.PLAIN_HEAD_MODEL_TYPES = plain
    fast, full = min(seconds["response positions"]), min(seconds["full logits"])
    same = abs(results["response positions"]["nll"] - results["full logits"]["nll"]) < 1e-4
    print(f"\neval scoring (OOD multiple choice, {len(items)} items, best of {max(1, repeats)}):")
    print(f"{'head on response positions':<30}{fast:>8.2f} s")
    print(f"{'head on all positions':<30}{full:>8.2f} s")
    print(f"speed-up {full / fast:.2f}x; same NLL to 1e-4: {same}")


def bench_train(args: argparse.Namespace) -> int:
    """Run both trainers (alternating, ``args.repeats`` rounds) and print tokens/s and the ratio."""
    from ..models import load_model
    from ..train import TrainConfig
    from ..train.loop import batch_order
    from ..train.objectives import format_example, pad_id

    loaded = load_model(args.model, device=args.device, verbose=False)
    tok = loaded.tokenizer
    steps, batch = args.steps + 1, args.batch_size  # + the warm-up step
    examples = _examples(steps * batch, seed=0)
    cfg = TrainConfig(
        steps=steps, batch_size=batch, lr=2e-4, max_length=args.tokens, seed=0, min_lr_ratio=1.0
    )
    features = [format_example(tok, e.prompt, e.response, args.tokens) for e in examples]
    # Our loop's batch order, replayed sequentially by the Trainer.
    order = batch_order(len(examples), batch, np.random.default_rng(cfg.seed))
    batches = [next(order) for _ in range(steps)]
    ordered = [features[i] for idx in batches for i in idx]
    tokens = sum(len(features[i]["input_ids"]) for idx in batches[1:] for i in idx)
    pad = pad_id(tok)
    seconds: dict[str, list[float]] = {"ours": [], "hf": []}
    for round_index, name in _alternating_rounds(["ours", "hf"], args.repeats):
        if name == "ours":
            seconds[name].append(_run_ours(loaded, examples, cfg))
        else:
            seconds[name].append(_run_hf(loaded, ordered, cfg, pad))
        print(f"  round {round_index + 1} {name:<5} {tokens / seconds[name][-1]:8.1f} tokens/s")

    def best(name: str) -> tuple[float, float]:
        fastest = min(seconds[name])
        return fastest, tokens / fastest

    ours_s, ours_tps = best("ours")
    hf_s, hf_tps = best("hf")
    print(f"\nbench train: {loaded.name}, {args.steps} timed steps x batch {batch}, max "
          f"{args.tokens} tokens, LoRA r={cfg.lora_r} on {','.join(cfg.target_modules)}, "
          f"device {loaded.device}, best of {max(1, args.repeats)} alternating rounds")  # fmt: skip
    print(f"{'trainer':<22}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'ours (train_stage)':<22}{ours_s:>10.2f}{ours_tps:>12.1f}")
    print(f"{'HF Trainer':<22}{hf_s:>10.2f}{hf_tps:>12.1f}")
    median = float(np.median(seconds["hf"]) / np.median(seconds["ours"]))
    print(f"\nours / HF Trainer tokens/s: {ours_tps / hf_tps:.3f}x best, {median:.3f}x median "
          "(goal >= 1.0)")  # fmt: skip
    _bench_eval_scoring(loaded, args.repeats)
    return 0
