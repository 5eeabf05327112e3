"""``python -m collapse_core.devtools.track_demo``: a real HF Trainer run observed end to end.

Fine-tunes a model (default the bundled SmolLM2; LoRA, or ``--full`` for all weights) on the
in-repo SFT samples with ``transformers.Trainer``, saving ``checkpoint-<step>`` every
``--save-steps``, with :class:`collapse_core.integrations.CollapseCallback` probing the in-memory
model on every save. Then it tracks the written folders with :func:`collapse_core.track.track`
twice: into the same database (every probe key must already be there: cache hits) and into a
fresh one (cold: loads and probes every checkpoint). Prints the step time, the callback's cost as
a share of training time and per probe as a multiple of the median step, and both track times.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path


def _train(args: argparse.Namespace, out: Path, callback) -> list[float]:
    """Train with HF Trainer; returns the wall-clock marks of every optimiser step's end."""
    from peft import get_peft_model
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from ..models import load_model
    from ..stagedata import load_stage
    from ..train import TrainConfig
    from ..train.loop import make_lora_config
    from ..train.objectives import collate, format_example, pad_id

    loaded = load_model(args.model, device=args.device, verbose=False)
    model, tok = loaded.model, loaded.tokenizer
    if not args.full:
        cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr)
        model = get_peft_model(model, make_lora_config(model, cfg))
    model.train()
    examples = load_stage("sft", "train", 24, seed=0, source="sample")
    features = [format_example(tok, e.prompt, e.response, args.max_length) for e in examples]
    marks: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *_a, **_k):
            marks.append(time.perf_counter())

    targs = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=args.batch_size, max_steps=args.steps,
        learning_rate=args.lr, save_steps=args.save_steps, save_only_model=True, logging_steps=1,
        report_to=[], dataloader_num_workers=0, use_cpu=loaded.device.type == "cpu",
        remove_unused_columns=False, disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=targs, train_dataset=features, processing_class=tok,
                      data_collator=lambda feats: collate(feats, pad_id(tok)),
                      callbacks=[StepClock(), callback])  # fmt: skip
    trainer.train()
    return marks


def main(argv: list[str] | None = None) -> int:
    """Run the demo (see module docstring) and print its measurements."""
    from ..integrations import CollapseCallback
    from ..probing import ProbeConfig
    from ..store import Store
    from ..track import TrackSettings, series_entries, track

    p = argparse.ArgumentParser(prog="python -m collapse_core.devtools.track_demo")
    p.add_argument("--out", required=True, help="Trainer output_dir (checkpoint-<step> folders)")
    p.add_argument("--db", required=True, help="DuckDB file for the callback and the warm track")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--save-steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--probe-max-prompts", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--name", default="smollm2 trainer demo")
    args = p.parse_args(argv)
    out = Path(args.out)
    config = ProbeConfig(max_prompts=args.probe_max_prompts)
    store = Store(args.db)
    callback = CollapseCallback(args.name, store=store, probe_sets=("general",),
                                probe_config=config, base=args.model)  # fmt: skip
    marks = _train(args, out, callback)
    steps = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    median_step = statistics.median(steps)
    report = callback.report()
    print(f"trained {args.steps} steps ({'full' if args.full else 'LoRA'}), median step "
          f"{median_step:.2f} s; training wall {report['train_seconds']:.1f} s")  # fmt: skip
    for label, seconds in callback.probe_times.items():
        print(f"  callback probe {label:<16} {seconds:6.2f} s = {seconds / median_step:.1f} steps")
    print(f"callback total {report['probe_seconds']:.1f} s = {100 * report['probe_share']:.1f} % "
          f"of training wall time")  # fmt: skip
    settings = TrackSettings(probe_sets=("general",), probe=config, base=args.model,
                             device=args.device)  # fmt: skip
    entries = series_entries([out], args.model)
    for label, target in (
        ("warm (same DB)", store),
        ("cold (fresh DB)", Store(str(args.db) + ".cold")),
    ):
        started = time.perf_counter()
        stages = track(entries, args.name, target, settings)
        seconds = time.perf_counter() - started
        same = all(s.probe_keys == callback.probe_keys.get(s.label) for s in stages)
        print(
            f"track {label}: {len(stages)} checkpoints in {seconds:.1f} s, "
            f"{sum(s.cached for s in stages)} cache hits, probe keys equal callback's: {same}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
