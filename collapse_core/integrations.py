"""Observe a training run from inside the trainer: :class:`CollapseCallback`.

A ``transformers.TrainerCallback`` (so it works in HF ``Trainer`` and every TRL trainer) that
probes the model *in memory* — no weights are reloaded — and commits each probe as the next stage
of a tracked series (:mod:`collapse_core.track`), so the dashboard shows the series grow::

    from collapse_core.integrations import CollapseCallback

    trainer = SFTTrainer(..., callbacks=[CollapseCallback("my-sft", db="data/collapse.duckdb",
                                                          base="path/to/base")])

- On every save (``checkpoint-<step>``) the checkpoint id is the content hash of the folder the
  trainer just wrote (:func:`collapse_core.models.peek_checkpoint_id`), so a later
  ``python -m collapse_core track OUTPUT_DIR --base BASE`` with the same probe settings finds
  the identical probe keys (cache hits).
- ``every_n_steps`` also probes between saves; those weights exist only in memory, so their id
  hashes the parameter tensors (``mem-…``) and the stage is labelled ``step-<n>``.
- With ``base`` the untouched starting model is probed at train begin as stage 0 ``base``.

The cost is reported as a share of the training wall time (:meth:`CollapseCallback.report`).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from .errors import CollapseError
from .models import LoadedModel, peek_checkpoint_id
from .probing import ProbeConfig, probe
from .store import Store
from .track import (
    TrackSettings,
    _truncate,
    commit_series_stage,
    register_series,
    train_losses,
)

__all__ = ["CollapseCallback", "memory_checkpoint_id"]


def memory_checkpoint_id(model: torch.nn.Module) -> str:
    """``mem-`` + sha256 over the parameters' names, dtypes, shapes and bytes (name order)."""
    digest = hashlib.sha256()
    for name, param in sorted(model.state_dict().items()):
        tensor = param.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return "mem-" + digest.hexdigest()[:12]


class CollapseCallback(TrainerCallback):
    """Probe the in-memory model on save (and every ``every_n_steps``) into a tracked series.

    ``name`` names the study/run (as ``track --name``); ``probe_sets`` and ``probe_config`` must
    match a later ``track`` for equal probe keys; ``base`` is the starting model's spec (the
    ``--base`` of ``track``), needed for LoRA adapters, optional otherwise.
    """

    def __init__(
        self,
        name: str,
        db: str | Path | None = None,
        store: Store | None = None,
        every_n_steps: int = 0,
        probe_on_save: bool = True,
        probe_sets: tuple[str, ...] = ("general",),
        probe_config: ProbeConfig | None = None,
        base: str | Path | None = None,
        tokenizer: Any = None,
    ) -> None:
        if every_n_steps < 0:
            raise CollapseError("every_n_steps must be >= 0 (0 = only on save)")
        self.name = name
        self.store = store or Store(db)
        self.every_n_steps = int(every_n_steps)
        self.probe_on_save = probe_on_save
        self.settings = TrackSettings(
            probe_sets=tuple(probe_sets), probe=probe_config or ProbeConfig(),
            base=str(base) if base is not None else None,
        )  # fmt: skip
        self.tokenizer = tokenizer
        self.labels: list[str] = []
        self.probe_keys: dict[str, list[str]] = {}
        self.probe_times: dict[str, float] = {}
        self.probe_seconds = 0.0
        self.train_seconds = 0.0
        self._started: float | None = None
        self._plan: Any = None

    # -- bookkeeping --------------------------------------------------------------------------
    def report(self) -> dict[str, float]:
        """Probe time, training wall time (probes included) and the probes' share of it."""
        wall = self.train_seconds or (
            time.perf_counter() - self._started if self._started is not None else 0.0
        )
        share = self.probe_seconds / wall if wall > 0 else float("nan")
        return {"probe_seconds": self.probe_seconds, "train_seconds": wall, "probe_share": share,
                "n_probes": float(len(self.labels))}  # fmt: skip

    def _tokenizer(self, processing_class: Any) -> Any:
        tok = self.tokenizer or processing_class
        tok = getattr(tok, "tokenizer", tok)  # a multimodal processor wraps its tokenizer
        if tok is None:
            raise CollapseError("CollapseCallback needs a tokenizer: pass tokenizer=...")
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return tok

    def _probe(self, model: Any, tokenizer: Any, label: str, checkpoint_id: str, state: Any,
               path: Path | None, name: str | None = None) -> None:  # fmt: skip
        started = time.perf_counter()
        config = getattr(model, "config", None)
        index = len(self.labels)
        self._plan = register_series(self.store, self.name, [*self.labels, label],
                                     self.settings.describe())  # fmt: skip
        loaded = LoadedModel(
            model=model, tokenizer=tokenizer, checkpoint_id=checkpoint_id, name=name or label,
            source=str(path) if path else "in-memory", kind="lora" if hasattr(model, "peft_config")
            else "hf", architecture=str(config.model_type),
            n_layers=int(getattr(config, "num_hidden_layers", None) or config.n_layer),
            d_model=int(getattr(config, "hidden_size", None) or config.n_embd),
            n_params=sum(p.numel() for p in model.parameters()),
            device=next(model.parameters()).device, path=path,
            extra={"run_id": self._plan.run_id, "stage": label, "stage_index": index},
        )  # fmt: skip
        from .devices import eval_mode

        keys = []
        with eval_mode(model):
            for probe_set in self.settings.probe_sets:
                result = probe(loaded, probe_set, self.settings.probe, store=self.store,
                               checkpoint_extra=dict(loaded.extra))  # fmt: skip
                keys.append(result.probe_key)
        seconds = time.perf_counter() - started
        losses = [float(h["loss"]) for h in state.log_history if "loss" in h]
        if path is not None:
            losses = train_losses(path, state.global_step) or losses
        adapter = path is not None and (path / "adapter_config.json").exists()
        commit_series_stage(self.store, self._plan, loaded, index, label,
                            str(path) if adapter else None, int(state.global_step), losses,
                            seconds)  # fmt: skip
        self.labels.append(label)
        self.probe_keys[label] = keys
        self.probe_times[label] = time.perf_counter() - started
        self.probe_seconds += self.probe_times[label]

    # -- trainer events -----------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Start the clock; keep stages up to the resumed step; probe the base as stage 0."""
        self._started = time.perf_counter()
        from .track import series_ids

        _, run_id = series_ids(self.name)
        kept = self.store.query(
            "SELECT stage FROM stages WHERE run_id = ? AND steps <= ? ORDER BY stage_index",
            [run_id, int(state.global_step)],
        )
        self.labels = list(kept["stage"]) if state.global_step > 0 else []
        _truncate(self.store, run_id, len(self.labels))
        if self.settings.base is not None and not self.labels and state.is_world_process_zero:
            base_id = peek_checkpoint_id(self.settings.base)
            if base_id is None:
                raise CollapseError(f"base {self.settings.base} is not a readable model")
            self._probe(model, self._tokenizer(processing_class), "base", base_id, state, None,
                        Path(self.settings.base).name)  # fmt: skip

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Probe every ``every_n_steps`` unless this step is saved (then on_save probes)."""
        due = self.every_n_steps and state.global_step % self.every_n_steps == 0
        if not due or (control.should_save and self.probe_on_save):
            return
        if state.is_world_process_zero:
            self._probe(model, self._tokenizer(processing_class), f"step-{state.global_step}",
                        memory_checkpoint_id(model), state, None)  # fmt: skip

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs):
        """Probe the in-memory model under the id of the checkpoint folder just written."""
        if not self.probe_on_save or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        checkpoint_id = peek_checkpoint_id(folder, self.settings.base)
        if checkpoint_id is None:
            raise CollapseError(
                f"cannot identify {folder} (a LoRA adapter needs base=...); nothing was probed"
            )
        self._probe(model, self._tokenizer(processing_class), folder.name, checkpoint_id, state,
                    folder)  # fmt: skip

    def on_train_end(self, args, state, control, **kwargs):
        """Freeze the wall time and print the probes' share of it."""
        if self._started is not None:
            self.train_seconds = time.perf_counter() - self._started
        if self._plan is not None:
            from .lifecycle import release_run

            release_run(self.store, self._plan.run_id)  # done; the claim is dropped
        r = self.report()
        print(f"collapse: {int(r['n_probes'])} probes took {r['probe_seconds']:.1f} s = "
              f"{100 * r['probe_share']:.1f} % of {r['train_seconds']:.1f} s training")  # fmt: skip
