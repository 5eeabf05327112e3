"""``python -m collapse_core bench train``: LoRA SFT tokens/s, our loop vs Hugging Face Trainer.

Same model weights, same formatted examples (our chat formatting, response-only labels), same
batch order, batch size, LoRA config (r, α, target modules), AdamW learning rate and number of
steps; both on the same device in one process, Trainer with dataloader_num_workers=0 and no
evaluation, logging or saving. Tokens = non-pad input tokens processed. A warm-up step of each
is excluded from timing.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch


def _examples(n: int, seed: int):
    from .stagedata import load_stage

    return load_stage("sft", "train", n, seed=seed, source="sample" if n <= 24 else "full")


def bench_train(args: argparse.Namespace) -> int:
    """Run both trainers and print tokens/s and the ratio."""
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments

    from .models import load_model
    from .train import TrainConfig, train_stage
    from .train.loop import make_lora_config
    from .train.objectives import collate, format_example, pad_id

    loaded = load_model(args.model, device=args.device, verbose=False)
    tok = loaded.tokenizer
    steps, batch = args.steps, args.batch_size
    examples = _examples(steps * batch, seed=0)
    while len(examples) < (steps + 1) * batch:
        examples = examples + examples
    cfg = TrainConfig(steps=steps + 1, batch_size=batch, lr=2e-4, max_length=args.tokens, seed=0)
    features = [format_example(tok, e.prompt, e.response, args.tokens) for e in examples]
    pad = pad_id(tok)

    # -- ours ---------------------------------------------------------------------------------
    model_ours = copy.deepcopy(loaded.model)
    timings: list[float] = []
    last = [time.perf_counter()]

    def progress(step: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        timings.append(now - last[0])
        last[0] = now

    result = train_stage(model_ours, tok, examples, "sft", cfg, progress=progress)
    ours_seconds = sum(timings[1:])  # drop the warm-up step
    ours_tokens = result.tokens * steps / (steps + 1)
    del model_ours, result

    # -- Hugging Face Trainer -----------------------------------------------------------------
    model_hf = get_peft_model(copy.deepcopy(loaded.model), make_lora_config(loaded.model, cfg))
    dataset = features[: (steps + 1) * batch]
    hf_tokens = [0]

    def collator(feats):
        out = collate(feats, pad)
        hf_tokens[0] += int(out["attention_mask"].sum())
        return out

    class TimedTrainer(Trainer):
        step_times: list[float] = []

        def training_step(self, *a, **kw):
            start = time.perf_counter()
            loss = super().training_step(*a, **kw)
            if loaded.device.type == "cuda":
                torch.cuda.synchronize()
            self.step_times.append(time.perf_counter() - start)
            return loss

    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=batch, max_steps=steps + 1,
            learning_rate=2e-4, lr_scheduler_type="constant", logging_strategy="no",
            save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
            use_cpu=loaded.device.type == "cpu", bf16=loaded.device.type == "cuda",
            remove_unused_columns=False, disable_tqdm=True,
        )  # fmt: skip
        trainer = TimedTrainer(
            model=model_hf, args=targs, train_dataset=dataset, data_collator=collator
        )
        start = time.perf_counter()
        trainer.train()
        hf_wall = time.perf_counter() - start
    hf_step_seconds = sum(TimedTrainer.step_times[1:])
    hf_tok = hf_tokens[0] * steps / (steps + 1)
    ours_tps = ours_tokens / ours_seconds
    hf_tps = hf_tok / hf_step_seconds
    print(f"\nbench train: {loaded.name}, {steps} steps x batch {batch}, max {args.tokens} "
          f"tokens, LoRA r={cfg.lora_r}, device {loaded.device}")  # fmt: skip
    print(f"{'trainer':<22}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'ours (train_stage)':<22}{ours_seconds:>10.2f}{ours_tps:>12.1f}")
    print(f"{'HF Trainer (steps)':<22}{hf_step_seconds:>10.2f}{hf_tps:>12.1f}")
    print(f"{'HF Trainer (wall)':<22}{hf_wall:>10.2f}{hf_tok / hf_wall:>12.1f}")
    print(f"\nours / HF Trainer tokens/s: {ours_tps / hf_tps:.3f}x (goal >= 1.0; HF timed per "
          "training_step only, which excludes its data loading and loop overhead)")  # fmt: skip
    return 0
