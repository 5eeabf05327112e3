"""Track your own training run: an ordered series of checkpoints as a study with one run.

``python -m collapse_core track PATH [PATH ...] --name NAME`` turns checkpoints written by any
trainer into the same rows a pipeline run writes (``studies``/``runs``/``stages``, probes, and
with ``--eval`` evals, calibration bins and weight-update metrics), so every page works on it.

What a PATH may be (checkpoint-<step> folders, model/adapter folders, .gguf, a TOML series)
and how checkpoints are labelled and ordered is :mod:`collapse_core.series`. Stage 0 is ``base``
when a base is given (the reference of adapters), otherwise the first checkpoint.

Caching: a checkpoint's id is its weights' content hash (:func:`collapse_core.models.
peek_checkpoint_id`, no weights loaded), so re-running on the same folders finds every stage
committed and loads nothing. A changed series is rewritten from its first differing stage.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Cancelled, CollapseError
from .probesets import load_probe_set
from .probing import ProbeConfig, probe, probe_key
from .series import SeriesEntry, check_one_model, discover
from .store import Store, dumps

ProgressFn = Callable[[float, str], None]
LogFn = Callable[[str], None]
TRACK_ARM = "tracked"


def _silent(*_: Any) -> None:
    return None


# -- the study rows ------------------------------------------------------------------------
def series_ids(name: str) -> tuple[str, str]:
    """(study_id, run_id) of a tracked series: a hash of its name (re-tracking resumes it)."""
    digest = hashlib.sha256(f"track:{name}".encode()).hexdigest()
    return f"study-{digest[:10]}", f"run-{digest[10:20]}"


def _plan(name: str, labels: Sequence[str]) -> Any:
    from .pipeline import RunPlan

    study_id, run_id = series_ids(name)
    return RunPlan(study_id, run_id, name, list(labels[1:]), 0, TRACK_ARM)


def register_series(
    store: Store, name: str, labels: Sequence[str], settings: dict, claim: bool = True
) -> Any:
    """Create (or update) the study and its one run, claimed by this process unless ``claim``
    is False (a Ray worker's scratch DB); returns the pipeline's RunPlan."""
    from .pipeline import _register
    from .runconfig import RunConfig

    plan = _plan(name, labels)
    raw = {"track": {"name": name, **settings}}
    config = RunConfig(name=name, model=str(settings.get("base") or ""), orders=[plan.order],
                       seeds=[0], arms=[TRACK_ARM], raw=raw)  # fmt: skip
    _register(store, config, [plan])
    # The series' settings are those of its latest track (resume_point rewrites its stages
    # when they changed), so a re-track with other settings updates them rather than leaving
    # the first track's.
    store.execute(
        "UPDATE runs SET stage_order = ?, config_json = ? WHERE run_id = ?",
        [",".join(plan.order), dumps(raw), plan.run_id],
    )
    store.execute(
        "UPDATE studies SET config_json = ? WHERE study_id = ?", [dumps(raw), plan.study_id]
    )
    if claim:
        from .lifecycle import claim_run

        claim_run(store, plan.run_id)  # running, owned by this process (reaped if it dies)
    return plan


def settings_change(store: Store, name: str, settings: dict) -> str | None:
    """What differs between the settings series ``name`` was last tracked with and
    ``settings`` (``TrackSettings.describe()``), e.g. "probe_sets ['general'] -> ['math']";
    None for a new series or the same settings. Call before :func:`register_series`."""
    _, run_id = series_ids(name)
    df = store.query("SELECT config_json FROM runs WHERE run_id = ?", [run_id])
    if df.empty:
        return None
    old = json.loads(df["config_json"][0] or "{}").get("track", {})
    new = json.loads(dumps({"name": name, **settings}))
    diffs = [f"{key} {old.get(key)!r} -> {new.get(key)!r}"
             for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]  # fmt: skip
    return "; ".join(diffs) or None


def commit_series_stage(
    store: Store,
    plan: Any,
    loaded: Any,
    index: int,
    label: str,
    adapter_path: str | None,
    step: int,
    losses: Sequence[float],
    seconds: float,
    evals: Any = None,
    lora_rows: Sequence[dict] = (),
) -> None:
    """Commit checkpoint ``index`` of a series through the pipeline's commit step (the same
    rows a pipeline stage writes); ``evals=None``: probed only, stored generations kept."""
    from .pipeline import CheckpointEvals, LoraMetricRow, StageRecord, _commit_stage

    # A tracked adapter is a LoRA stage; how a full checkpoint of the series was trained is
    # not known here, so its method stays NULL.
    method = "lora" if adapter_path else None
    record = StageRecord(index, label, adapter_path, int(step), tuple(losses), float(seconds),
                         method)  # fmt: skip
    evals = evals if evals is not None else CheckpointEvals([], [], {}, None)
    _commit_stage(store, plan, loaded, record, evals, [LoraMetricRow(**r) for r in lora_rows])


def _truncate(store: Store, run_id: str, from_index: int) -> None:
    """Drop the committed stages from ``from_index`` on (a changed series is rewritten)."""
    old = store.query(
        "SELECT stage_index, stage FROM stages WHERE run_id = ? AND stage_index >= ?",
        [run_id, from_index],
    )
    labels = [f"{int(i)}:{s}" for i, s in zip(old["stage_index"], old["stage"], strict=True)]
    with store.transaction() as con:
        con.execute(
            "DELETE FROM stages WHERE run_id = ? AND stage_index >= ?", [run_id, from_index]
        )
        for label in labels:
            con.execute("DELETE FROM evals WHERE run_id = ? AND stage = ?", [run_id, label])
            con.execute("DELETE FROM lora_metrics WHERE run_id = ? AND stage = ?", [run_id, label])


def train_losses(path: str | Path, step: int | None) -> list[float]:
    """Logged training losses up to ``step`` from a checkpoint's ``trainer_state.json``."""
    state = Path(path) / "trainer_state.json"
    if not state.is_file():
        return []
    try:
        history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return []
    return [float(h["loss"]) for h in history if isinstance(h, dict) and "loss" in h
            and (step is None or int(h.get("step", 0)) <= step)]  # fmt: skip


# -- weight updates ------------------------------------------------------------------------
def block_weights(model: Any) -> dict[str, np.ndarray]:
    """Every linear weight inside the transformer blocks as float32 (out × in), by module name
    (embeddings and the LM head are left out: a (vocab × d) SVD per checkpoint is too slow)."""
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from .models import model_parts

    blocks = model_parts(model).blocks
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    out = {}
    for name, module in blocks.named_modules():
        if isinstance(module, (nn.Linear, Conv1D)):
            weight = module.weight.detach().float().cpu().numpy()
            out[f"{prefix}.{name}"] = weight.T.copy() if isinstance(module, Conv1D) else weight
    return out


def step_delta(
    previous: dict[str, np.ndarray], current: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """ΔW = W_k − W_{k−1} of every module present in both that changed (all-zero ΔW left out)."""
    delta = {m: current[m] - previous[m] for m in current if m in previous}
    return {m: d for m, d in delta.items() if np.any(d)}


def weight_update_rows(
    start: dict[str, np.ndarray],
    previous: dict[str, np.ndarray],
    current: dict[str, np.ndarray],
    stage: str,
    previous_stage: str | None,
    previous_delta: dict[str, np.ndarray] | None,
) -> tuple[list[dict], dict[str, np.ndarray]]:
    """Update geometry of full-weight checkpoint ``stage`` (rows of the ``lora_metrics`` table)
    and its step update ΔW = W_k − W_{k−1} per module (only modules that changed).

    Reuses :func:`collapse_core.train.lora_metrics.lora_update_metrics` on
    (1) the step update ΔW against W_{k−1}: effective/stable rank, norms, update rank, relative
    norm, intruder dimensions, and principal angles / overlap with the previous step's update
    (``other_stage`` = that stage); (2) the cumulative update W_k − W_0 against W_0: the same
    spectrum metrics prefixed ``cumulative_`` and ``intruder_dimensions_cumulative``.
    """
    from .train.lora_metrics import lora_update_metrics

    delta = step_delta(previous, current)
    total = {m: current[m] - start[m] for m in delta if m in start}
    stages: dict[str, dict[str, np.ndarray]] = {}
    if previous_stage is not None and previous_delta:
        stages[previous_stage] = previous_delta
    stages[stage] = delta
    # With base_after = 1 the chain start is W_{k-1} - ΔW_{k-1}, so `stage` starts from W_{k-1}.
    step_rows = lora_update_metrics(
        stages, {m: previous[m] for m in delta}, base_after=len(stages) - 1, only_stage=stage
    )
    rows = [r for r in step_rows if r["metric"] != "intruder_dimensions_cumulative"]
    for r in lora_update_metrics({stage: total}, {m: start[m] for m in total}, only_stage=stage):
        if r["metric"] == "intruder_dimensions_cumulative":
            continue
        metric = r["metric"]
        r["metric"] = ("intruder_dimensions_cumulative" if metric == "intruder_dimensions"
                       else f"cumulative_{metric}")  # fmt: skip
        rows.append(r)
    return rows, delta


# -- tracking ------------------------------------------------------------------------------
@dataclass
class TrackSettings:
    """What a tracked series measures; ``eval`` turns on the held-out/OOD/plasticity evals and
    the weight-update metrics. ``eval_settings`` overrides keys of the pipeline's [eval]."""

    probe_sets: tuple[str, ...] = ("general",)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    base: str | None = None
    evaluate: bool = False
    data_source: str = "full"
    device: str = "auto"
    eval_settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.eval_section()  # unknown keys, types and ranges: one line, before anything runs
        if self.data_source not in ("full", "sample"):
            raise CollapseError("data_source must be 'full' or 'sample'")
        if not self.probe_sets:
            raise CollapseError("give at least one probe set")
        for name in self.probe_sets:  # a mistyped set fails here, not after the first load
            load_probe_set(name)

    def describe(self) -> dict:
        """JSON-able form stored in the study's config_json."""
        return {"probe_sets": list(self.probe_sets), "probe": self.probe.key_fields(),
                "base": self.base, "eval": self.evaluate, "data_source": self.data_source,
                "eval_settings": self.eval_settings}  # fmt: skip

    def eval_section(self) -> Any:
        """``eval_settings`` as the pipeline's typed [eval] section (:class:`EvalSection`)."""
        from .runconfig import EvalSection
        from .sections import from_table

        return from_table(EvalSection, self.eval_settings, "eval", where="track")

    def run_config(self, name: str) -> Any:
        """A pipeline RunConfig carrying the eval settings (for ``evaluate_checkpoint``)."""
        from .probing import ProbeSection
        from .runconfig import RunConfig
        from .train.loop import TrainSection

        return RunConfig(
            name=name, model=str(self.base or ""), orders=[[]], seeds=[0],
            data_source=self.data_source, device=self.device, train=TrainSection(),
            eval=self.eval_section(), probe=ProbeSection(),
            raw={"eval": dict(self.eval_settings)},
        )  # fmt: skip


@dataclass
class TrackedStage:
    """What happened to one checkpoint of the series."""

    index: int
    label: str
    step: int | None
    checkpoint_id: str
    probe_keys: list[str]
    cached: bool
    seconds: float


def series_entries(paths: Sequence[str | Path], base: str | None) -> list[SeriesEntry]:
    """:func:`discover` with the base prepended as stage 0 (step 0) when one is given."""
    entries = discover(paths)
    if base is not None:
        entries.insert(0, SeriesEntry("base", str(base), 0))
    from . import assets

    check_one_model([replace(e, path=str(assets.builtin_dir(e.path, verbose=False)))
                     if e.path in assets.MODEL_ALIASES else e for e in entries])  # fmt: skip
    return entries


def _committed(store: Store, run_id: str) -> list[tuple[str, str]]:
    df = store.query(
        "SELECT stage, checkpoint_id FROM stages WHERE run_id = ? ORDER BY stage_index", [run_id]
    )
    return list(zip(df["stage"], df["checkpoint_id"], strict=True))


def _complete(store: Store, checkpoint_id: str, settings: TrackSettings) -> list[str] | None:
    """The probe keys of a checkpoint if every probe set is stored, else None."""
    keys = [
        probe_key(checkpoint_id, load_probe_set(s), settings.probe) for s in settings.probe_sets
    ]
    return keys if all(store.has_probe(k) for k in keys) else None


def checkpoint_ids(entries: Sequence[SeriesEntry], settings: TrackSettings) -> list[str | None]:
    """Each entry's checkpoint id from file hashes alone (:func:`peek_checkpoint_id`)."""
    from .models import peek_checkpoint_id

    return [peek_checkpoint_id(e.path, settings.base if i else None)
            for i, e in enumerate(entries)]  # fmt: skip


def resume_point(
    store: Store,
    run_id: str,
    entries: Sequence[SeriesEntry],
    ids: Sequence[str | None],
    settings: TrackSettings,
    log: LogFn = _silent,
    changed: str | None = None,
) -> tuple[list[TrackedStage], int]:
    """The leading checkpoints already committed unchanged (label, weights and every probe
    set), as cache hits, and the index of the first one to (re)do; committed stages from there
    on belong to a changed series and are dropped. ``changed`` (:func:`settings_change`): the
    series was tracked with other settings, so every stage is redone (its probes with these
    settings may still be cache hits)."""
    committed = _committed(store, run_id)
    out: list[TrackedStage] = []
    first_new, reason = 0, f"settings changed: {changed}"
    for i, entry in enumerate(entries if changed is None else ()):
        if i >= len(committed):
            break
        if committed[i] != (entry.label, ids[i]):
            reason = f"{entry.label} is not the checkpoint committed as {committed[i][0]}"
            break
        keys = _complete(store, ids[i], settings) if ids[i] else None
        if keys is None:
            reason = f"{entry.label} lacks a probe set with these settings"
            break
        out.append(TrackedStage(i, entry.label, entry.step, ids[i], keys, True, 0.0))
        first_new = i + 1
    if first_new < len(committed):
        log(f"series changed at stage {first_new} ({reason}); rewriting from there")
        _truncate(store, run_id, first_new)
    return out, first_new


def track_checkpoint(
    store: Store,
    plan: Any,
    entries: Sequence[SeriesEntry],
    i: int,
    settings: TrackSettings,
    weights: dict[str, Any],
    data: Any = None,
    progress: ProgressFn = _silent,
    log: LogFn = _silent,
    should_stop: Callable[[], bool] | None = None,
) -> TrackedStage:
    """Probe (and with ``data``, the eval settings' :class:`StageData`, evaluate) checkpoint
    ``i`` of the series and commit it as stage ``i`` of ``plan``'s run. ``weights`` carries the
    previous checkpoint's weights between calls (an empty dict: reloaded from disk). The one
    body of the local loop and of a Ray task (:func:`collapse_core.distributed.track_ray`)."""
    from .models import load_model
    from .pipeline import evaluate_checkpoint

    entry = entries[i]
    progress(i / len(entries), f"{entry.label}: loading")
    started = time.perf_counter()
    loaded = load_model(entry.path, settings.base if i and _adapter(entry) else None,
                        settings.device, verbose=False)  # fmt: skip
    if not (i == 0 and settings.base is not None):  # the base keeps its own name
        loaded.name = entry.label  # users see their own names, never an upload's temp folder
    loaded.extra.update({"run_id": plan.run_id, "stage": entry.label, "stage_index": i})
    keys, all_cached = [], True
    for probe_set in settings.probe_sets:
        result = probe(loaded, probe_set, settings.probe, store=store,
                       checkpoint_extra=dict(loaded.extra), should_stop=should_stop)  # fmt: skip
        keys.append(result.probe_key)
        all_cached &= result.cached
    evals, lora_rows = None, []
    if data is not None:
        progress((i + 0.5) / len(entries), f"{entry.label}: evaluating")
        evals = evaluate_checkpoint(loaded, data.config, data, [], log)
        lora_rows = _update_rows(weights, entries, i, loaded, settings, log)
    seconds = time.perf_counter() - started
    commit_series_stage(store, plan, loaded, i, entry.label,
                        entry.path if _adapter(entry) else None,
                        entry.step if entry.step is not None else i,
                        train_losses(entry.path, entry.step), seconds, evals, lora_rows)  # fmt: skip
    log(f"{i}:{entry.label} {'cache hit' if all_cached else f'{seconds:.1f} s'}")
    return TrackedStage(i, entry.label, entry.step, loaded.checkpoint_id, keys, all_cached,
                        seconds)  # fmt: skip


def eval_data(name: str, settings: TrackSettings) -> Any:
    """The :class:`StageData` a series' evals read (seed 0), or None without ``evaluate``."""
    from .pipeline import StageData

    return StageData(settings.run_config(name), 0) if settings.evaluate else None


def track(
    entries: Sequence[SeriesEntry],
    name: str,
    store: Store,
    settings: TrackSettings | None = None,
    progress: ProgressFn = _silent,
    log: LogFn = _silent,
    should_stop: Callable[[], bool] | None = None,
) -> list[TrackedStage]:
    """Probe (and with ``settings.evaluate`` evaluate) every checkpoint of a series and commit it
    as stage ``index`` of the series' run; committed identical stages are cache hits. However it
    ends, the run is marked done / failed / cancelled / interrupted and its claim released."""
    from .lifecycle import released_run

    settings = settings or TrackSettings()
    changed = settings_change(store, name, settings.describe())
    plan = register_series(store, name, [e.label for e in entries], settings.describe())
    with released_run(store, plan.run_id):
        ids = checkpoint_ids(entries, settings)
        out, first_new = resume_point(store, plan.run_id, entries, ids, settings, log, changed)
        data = eval_data(name, settings)
        weights: dict[str, Any] = {}
        for i in range(first_new, len(entries)):
            if should_stop is not None and should_stop():
                raise Cancelled("tracking cancelled; the stages committed so far are kept")
            out.append(track_checkpoint(store, plan, entries, i, settings, weights, data,
                                        progress, log, should_stop))  # fmt: skip
    progress(1.0, f"{len(entries)} checkpoints tracked")
    return out


def _adapter(entry: SeriesEntry) -> bool:
    return (Path(entry.path) / "adapter_config.json").exists()


def _update_rows(
    weights: dict[str, Any],
    entries: Sequence[SeriesEntry],
    index: int,
    loaded: Any,
    settings: TrackSettings,
    log: LogFn,
) -> list[dict]:
    """Weight-update rows of stage ``index``; ``weights`` keeps W_0, W_{k-1}, ΔW_{k-1} between
    calls (earlier checkpoints are loaded again only when a run resumes mid-series)."""
    from .models import load_model

    current = block_weights(loaded.model)
    if index == 0:
        weights.update(start=current, previous=current, delta=None, previous_index=0)
        return []
    if weights.get("previous_index") != index - 1:

        def reload(i: int) -> dict[str, np.ndarray]:
            e = entries[i]
            m = load_model(e.path, settings.base if i and _adapter(e) else None, "cpu",
                           verbose=False)  # fmt: skip
            return block_weights(m.model)

        previous = reload(index - 1)
        # ΔW_{k-1} too, so a resumed series (or a Ray task, which starts from nothing) stores
        # the same overlap-with-previous-update rows as an uninterrupted local run.
        delta = step_delta(reload(index - 2), previous) if index >= 2 else None
        weights.update(start=reload(0), previous=previous, delta=delta)
    prev_label = f"{index - 1}:{entries[index - 1].label}" if index > 1 else None
    stage = f"{index}:{entries[index].label}"
    rows, delta = weight_update_rows(weights["start"], weights["previous"], current, stage,
                                     prev_label, weights.get("delta"))  # fmt: skip
    weights.update(previous=current, delta=delta, previous_index=index)
    log(f"{stage}: update metrics on {len(delta)} changed modules")
    return rows


def watch(
    paths: Sequence[str | Path],
    name: str,
    store: Store,
    settings: TrackSettings | None = None,
    poll_seconds: float = 30.0,
    max_polls: int | None = None,
    stop: threading.Event | None = None,
    log: LogFn = _silent,
) -> list[TrackedStage]:
    """Track ``paths`` now and again every ``poll_seconds`` as new checkpoints appear.

    A checkpoint that cannot be loaded yet (still being written) is retried at the next poll.
    Ends after ``max_polls`` polls (tests; None = until ``stop`` is set or Ctrl-C).
    """
    settings = settings or TrackSettings()
    done: list[TrackedStage] = []
    polls = 0
    while True:
        polls += 1
        try:
            entries = series_entries(paths, settings.base)
            done = track(entries, name, store, settings, log=log)
            new = [s for s in done if not s.cached]
            if new:
                log(f"poll {polls}: {len(new)} new checkpoint(s), {len(done)} in the series")
        except CollapseError as err:
            log(f"poll {polls}: {err}; retrying")
        if (max_polls is not None and polls >= max_polls) or (stop is not None and stop.is_set()):
            return done
        if stop is not None:
            stop.wait(poll_seconds)
        else:
            time.sleep(poll_seconds)
