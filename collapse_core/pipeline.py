"""Sequential post-training runs: train stage after stage, probe and evaluate every checkpoint.

Read top to bottom, one run is::

    base checkpoint ── probe + evals ──► stage 1 (LoRA train → save adapter → merge, or full
    fine-tune → save ΔW) ── probe + evals + weight-update metrics ──► stage 2 ... ──► last stage

``[train] method`` picks LoRA or full fine-tuning for every stage of a run; either way the
stage's weights are saved in full (safetensors, ``save_pretrained``) as the next stage's start,
and the update ΔW of the target modules feeds the ``lora_metrics`` table (LoRA: (α/r) B A,
saved as the adapter; full FT: W_after − W_before, saved as ``stage<i>_<stage>_delta.safetensors``
so a resumed run can still compare later updates with it). ``runs.method`` and
``stages.method`` record which (NULL on the untrained base row).

A stage is committed to the ``stages`` table only after its checkpoint, probes, evals and
update metrics are stored, so a killed run resumes from the last finished stage: the weights
of the last finished stage are kept under ``data/runs/<run_id>/``.

A study = one config × its orders × seeds × intervention arms; every (order, seed, arm) is a run.

:func:`execute_run` is a sequence of named steps sharing one :class:`_RunSteps`:
``_prepare_run`` → ``_start_from_base`` (stage 0) or ``_resume_after`` → per stage
``_train_and_merge`` (``_train``, ``_save_and_merge`` or ``_keep_full``, ``_lora_update_rows``,
``_save_merged``)
→ ``_probe_all`` → :func:`evaluate_checkpoint` (``_domain_evals``, ``_code_generation_evals``,
``_refusal_generation_evals``, ``_ood_evals``, ``_plasticity_evals``) → ``_commit_stage``. The
steps return typed rows (:class:`EvalRow`, :class:`CalibrationBin`, :class:`GenerationRow`,
:class:`LoraMetricRow`, :class:`CheckpointEvals`, :class:`StageRecord`); only the commit step
writes them.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import Cancelled, CollapseError
from .eval_intervals import Estimate
from .lifecycle import cancel_waiting_runs, recorded_run
from .monitor import watching
from .names import STAGE_OBJECTIVES, STAGES
from .paths import runs_dir
from .runclaims import claimed
from .runconfig import RunConfig
from .store import Store, dumps

ProgressFn = Callable[[float, str], None]
CLAIM_POLL_S = 2.0  # how often a study re-checks runs that another process holds
LogFn = Callable[[str], None]


def _silent(*_: Any) -> None:
    return None


@dataclass
class RunPlan:
    """One (order, seed, arm) of a study."""

    study_id: str
    run_id: str
    name: str
    order: list[str]
    seed: int
    arm: str


def study_id_for(config: RunConfig) -> str:
    """Deterministic study id: hash of the config (so rerunning the same file resumes it).

    ``[train] method = "lora"`` written out is the default and hashes as if left out, so a
    config keeps its study (and run ids) whether or not it spells the default."""
    raw = config.raw
    train = raw.get("train")
    if isinstance(train, dict) and train.get("method") == "lora":
        raw = {**raw, "train": {k: v for k, v in train.items() if k != "method"}}
    return "study-" + hashlib.sha256(dumps(raw).encode()).hexdigest()[:10]


def plan_runs(config: RunConfig) -> list[RunPlan]:
    """Every (order, seed, arm) combination of the config, with deterministic run ids."""
    sid = study_id_for(config)
    plans = []
    for order in config.orders:
        for seed in config.seeds:
            for arm in config.arms:
                key = dumps({"study": sid, "order": order, "seed": seed, "arm": arm})
                run_id = "run-" + hashlib.sha256(key.encode()).hexdigest()[:10]
                name = f"{config.name} · {'→'.join(order)} · seed {seed} · {arm}"
                plans.append(RunPlan(sid, run_id, name, list(order), seed, arm))
    return plans


def run_dir(run_id: str) -> Path:
    """Where a run keeps adapters and merged checkpoints (under :func:`paths.runs_dir`)."""
    path = runs_dir() / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def _register(store: Store, config: RunConfig, plans: list[RunPlan]) -> None:
    now = dt.datetime.now()
    # a tracked series has no [train] section: how its checkpoints were trained is unknown
    method = config.train.method if config.train is not None else None
    with store.transaction() as con:
        sid = plans[0].study_id
        if not con.execute("SELECT 1 FROM studies WHERE study_id = ?", [sid]).fetchone():
            con.execute(
                "INSERT INTO studies VALUES (?, ?, ?, ?)",
                [sid, config.name, dumps(config.raw), now],
            )
        for plan in plans:
            if con.execute("SELECT 1 FROM runs WHERE run_id = ?", [plan.run_id]).fetchone():
                continue
            con.execute(
                "INSERT INTO runs (run_id, study_id, name, arm, seed, stage_order, config_json, "
                "status, created_at, method) VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                [plan.run_id, sid, plan.name, plan.arm, plan.seed, ",".join(plan.order),
                 dumps(config.raw), now, method],
            )  # fmt: skip


def check_before_writing(config: RunConfig) -> None:
    """What :func:`~collapse_core.runconfig.parse_config` cannot know from the file alone, checked
    before the study is registered: the device exists here, the base model is a full model, and
    generation evals have their sandbox."""
    from .devices import resolve_device
    from .uploads import check_model_path

    resolve_device(config.device)
    if check_model_path(config.model) == "lora":
        raise CollapseError(f"{config.model}: a run starts from a full model, not a LoRA adapter")
    if config.eval.generation_n:
        from .sandbox import require_isolation

        require_isolation()  # generated code runs only isolated (or with the explicit opt-in)


def finished_stages(store: Store, run_id: str) -> pd.DataFrame:
    """The committed stages of a run, in order (stage_index 0 is the starting checkpoint)."""
    return store.query("SELECT * FROM stages WHERE run_id = ? ORDER BY stage_index", [run_id])


class StageData:
    """Lazily loaded, cached stage data for one seed (train and held-out splits)."""

    def __init__(self, config: RunConfig, seed: int) -> None:
        self.config = config
        self.seed = seed
        self._cache: dict[tuple, Any] = {}

    def get(self, stage: str, split: str, n: int) -> list:
        """``n`` examples of ``stage`` from ``split`` (deterministic for the seed)."""
        from .stagedata import load_stage

        key = (stage, split, n)
        if key not in self._cache:
            self._cache[key] = load_stage(
                stage, split, n, seed=self.seed, source=self.config.data_source
            )
        return self._cache[key]

    def ood(self, n: int) -> list:
        from .stagedata import load_ood_tasks

        key = ("ood", n)
        if key not in self._cache:
            self._cache[key] = load_ood_tasks(n, seed=self.seed, source=self.config.data_source)
        return self._cache[key]

    def plasticity(self, split: str, n: int) -> list:
        from .stagedata import load_plasticity_task

        key = ("plasticity", split, n)
        if key not in self._cache:
            self._cache[key] = load_plasticity_task(
                split, n, seed=self.seed, source=self.config.data_source
            )
        return self._cache[key]


# -- typed rows: what the steps return and the commit step writes ------------------------------


@dataclass(frozen=True)
class EvalRow:
    """One scalar evaluation of a checkpoint: an ``evals`` row without run/checkpoint/stage,
    with the number of items scored and a 95 % interval where the score has one
    (:mod:`collapse_core.eval_intervals`)."""

    eval: str
    metric: str
    value: float
    n: int | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    ci_method: str | None = None

    @classmethod
    def of(cls, eval: str, metric: str, est: Estimate) -> EvalRow:
        """The row of an :class:`~collapse_core.eval_intervals.Estimate`."""
        return cls(eval, metric, float(est.value), est.n, est.ci_low, est.ci_high, est.ci_method)


@dataclass(frozen=True)
class CalibrationBin:
    """One reliability-diagram bin of an eval: a ``calibration_bins`` row without checkpoint."""

    eval: str
    bin: int
    lower: float
    upper: float
    count: int
    mean_confidence: float
    accuracy: float


@dataclass(frozen=True)
class GenerationRow:
    """One generated answer with its verdict: a ``generations`` row without checkpoint."""

    eval: str
    item_id: str
    status: str
    prompt: str
    response: str
    program: str


@dataclass(frozen=True)
class LoraMetricRow:
    """One LoRA-update metric of a stage: a ``lora_metrics`` row without run."""

    stage: str
    module: str
    metric: str
    other_stage: str | None
    value: float


@dataclass
class CheckpointEvals:
    """Everything :func:`evaluate_checkpoint` measured on one checkpoint.

    ``generations=None`` means "keep the generations already stored for this checkpoint"
    (base evals reused from another run of the study)."""

    rows: list[EvalRow]
    bins: list[CalibrationBin]
    plasticity: dict[str, Any]
    generations: list[GenerationRow] | None


@dataclass(frozen=True)
class StageRecord:
    """The ``stages`` row that marks a stage finished (written last, by the commit step)."""

    index: int
    stage: str
    adapter_path: str | None
    steps: int
    train_losses: tuple[float, ...]
    seconds: float
    method: str | None = None  # "lora" / "full"; None for the untrained base checkpoint

    @property
    def label(self) -> str:
        """``"<index>:<stage>"``, the stage key of the evals and lora_metrics tables."""
        return f"{self.index}:{self.stage}"


# -- evaluation steps --------------------------------------------------------------------------


def heldout_domains(config: RunConfig, order: list[str]) -> list[str]:
    """Stages whose held-out split is evaluated: the run's order, then (unless ``[eval]
    heldout_domains = "order"``) every other stage, each once."""
    domains = config.eval.heldout_domains
    if domains == "order":
        return list(dict.fromkeys(order))
    return list(dict.fromkeys([*order, *STAGES]))


def _domain_evals(model: Any, tok: Any, stage: str, examples: list, bs: int) -> list[EvalRow]:
    """Held-out loss of one stage's data plus that stage's own score (DPO preference accuracy,
    refusal rates and margins, answer accuracy)."""
    from . import evals as E

    rows: list[EvalRow] = []
    if stage == "dpo":
        acc = E.dpo_preference_estimate(model, tok, examples, batch_size=bs)
        rows.append(EvalRow.of("dpo", "preference_accuracy", acc))
        # Held-out loss of a preference pair = SFT loss on its chosen response.
        sft_like = [e.__class__(prompt=e.prompt, response=e.chosen, meta=e.meta) for e in examples]
        loss = E.heldout_loss_estimate(model, tok, sft_like, batch_size=bs)
    else:
        loss = E.heldout_loss_estimate(model, tok, examples, batch_size=bs)
    rows.append(EvalRow.of(stage, "heldout_loss", loss))
    if stage == "safety":
        rates = E.refusal_rate(model, tok, examples, batch_size=bs)["estimates"]
        rows.append(EvalRow.of("safety", "refusal_rate", rates["refusal_rate"]))
        rows.append(EvalRow.of("safety", "over_refusal_rate", rates["over_refusal_rate"]))
        # Continuous margins (refusal − compliance log-prob per token) move even when
        # the binary rates sit at 0 after short LoRA stages.
        for key in ("refusal_margin_harmful", "refusal_margin_benign"):
            if rates[key].value == rates[key].value:
                rows.append(EvalRow.of("safety", key, rates[key]))
    if stage in ("math", "long_cot"):
        acc = E.answer_accuracy_estimate(model, tok, examples, batch_size=bs)
        rows.append(EvalRow.of(stage, "answer_accuracy", acc))
    return rows


def _code_generation_evals(
    model: Any, tok: Any, data: StageData, ev: dict[str, Any], log: LogFn
) -> tuple[list[EvalRow], list[GenerationRow]]:
    """Greedy HumanEval pass@1 (sandboxed tests) on ``generation_n`` held-out problems."""
    from . import evals as E

    # load_stage("code") draws half HumanEval (with tests) and half CodeI/O items.
    problems = [e for e in data.get("code", "heldout", 2 * ev.generation_n)
                if e.meta.get("entry_point")][: ev.generation_n]  # fmt: skip
    gen = E.code_pass_at_1(
        model, tok, problems, max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size
    )
    rows = [EvalRow.of("code", "pass_at_1", gen["estimates"]["pass_at_1"]),
            EvalRow("code", "pass_at_1_timeouts", gen["timeouts"], n=gen["n"])]  # fmt: skip
    samples = [GenerationRow("code_pass_at_1", r["task_id"], r["status"], r["prompt"],
                             r["response"], r["code"]) for r in gen["results"]]  # fmt: skip
    log(f"code pass@1 {gen['pass_at_1']:.3f} on {gen['n']} HumanEval problems")
    return rows, samples


def _refusal_generation_evals(
    model: Any, tok: Any, data: StageData, ev: dict[str, Any], log: LogFn
) -> tuple[list[EvalRow], list[GenerationRow]]:
    """Refusal rates of generated answers to held-out harmful and benign safety prompts."""
    from . import evals as E

    safety = data.get("safety", "heldout", max(ev.n_heldout, 2 * ev.generation_n))
    said = E.generated_refusal_rate(model, tok, safety, batch_size=ev.batch_size)
    rows = [EvalRow.of("safety", f"generated_{key}", said["estimates"][key])
            for key in ("refusal_rate", "over_refusal_rate") if said[key] == said[key]]  # fmt: skip
    samples = [GenerationRow("safety_refusal", f"{'harmful' if r['harmful'] else 'benign'}-{i}",
                             "refused" if r["refused"] else "answered", r["prompt"],
                             r["response"], "")
               for i, r in enumerate(said["results"])]  # fmt: skip
    log(f"generated refusal rate {said['refusal_rate']:.3f}, "
        f"over-refusal {said['over_refusal_rate']:.3f}")  # fmt: skip
    return rows, samples


def _ood_evals(
    model: Any, tok: Any, data: StageData, ev: dict[str, Any], log: LogFn
) -> tuple[list[EvalRow], list[CalibrationBin]]:
    """Multiple-choice accuracy, NLL and calibration (ECE, MCE, Brier, bins) on OOD tasks."""
    from . import evals as E

    mc = E.multiple_choice_eval(model, tok, data.ood(ev.n_ood), batch_size=ev.batch_size)
    rows = [
        EvalRow.of("ood", m, mc["estimates"][m]) for m in ("accuracy", "nll", "ece", "mce", "brier")
    ]
    bins = [CalibrationBin(eval="ood", **b) for b in mc["reliability_bins"]]
    log(f"OOD accuracy {mc['accuracy']:.3f}, ECE {mc['ece']:.3f}")
    return rows, bins


def _plasticity_evals(
    model: Any, tok: Any, config: RunConfig, data: StageData, log: LogFn
) -> tuple[list[EvalRow], dict[str, Any]]:
    """Loss-curve AUC of a short fit to a fresh task with the run's training method and lr
    (a LoRA adapter, or full fine-tuning; weights restored afterwards)."""
    from . import evals as E
    from .train import TrainConfig

    ev = config.eval
    train_ex = data.plasticity("train", ev.plasticity_n)
    eval_ex = data.plasticity("heldout", max(8, ev.plasticity_n // 4))
    tcfg = TrainConfig(
        steps=ev.plasticity_steps, batch_size=config.train.batch_size,
        lr=config.train.lr, lora_r=config.train.lora_r,
        lora_alpha=config.train.lora_alpha, max_length=config.train.max_length,
        seed=data.seed, method=config.train.method,
    )  # fmt: skip
    plast = E.plasticity(model, tok, train_ex, eval_ex, ev.plasticity_steps, tcfg)
    # One short training run, not a sample of items: no interval (n = steps).
    steps = len(plast["loss_curve"])
    rows = [EvalRow("plasticity", "auc", plast["auc"], n=steps),
            EvalRow("plasticity", "final_loss", plast["final_loss"], n=steps)]  # fmt: skip
    log(f"plasticity AUC {plast['auc']:.3f}")
    return rows, plast


def evaluate_checkpoint(
    loaded: Any,
    config: RunConfig,
    data: StageData,
    order: list[str],
    log: LogFn = _silent,
    progress: ProgressFn | None = None,
) -> CheckpointEvals:
    """All evaluations of one checkpoint, each step switched on by its ``[eval]`` setting:
    held-out domains (``n_heldout``), generations (``generation_n``: HumanEval pass@1 and
    generated refusals, one :class:`GenerationRow` per answer), OOD multiple choice and
    calibration (``n_ood``), plasticity (``plasticity_steps``).

    ``progress(fraction, message)`` gets the fraction of these steps done (each step counts
    one, split by its own batches), so a long evaluation never sits at one number."""
    model, tok = loaded.model, loaded.tokenizer
    ev = config.eval
    result = CheckpointEvals(rows=[], bins=[], plasticity={}, generations=[])
    steps: list[tuple[str, Callable[[], None]]] = []

    def add_rows(rows: list[EvalRow], samples: list[GenerationRow] | None = None) -> None:
        result.rows.extend(rows)
        result.generations.extend(samples or [])

    if ev.n_heldout:
        domains = heldout_domains(config, order)
        for stage in domains:
            steps.append((f"held-out {stage}", lambda stage=stage: add_rows(_domain_evals(
                model, tok, stage, data.get(stage, "heldout", ev.n_heldout),
                ev.batch_size))))  # fmt: skip
        steps.append(("", lambda: log(f"held-out evals on {len(domains)} domains done")))
    if ev.generation_n:
        steps.append(("code pass@1", lambda: add_rows(*_code_generation_evals(model, tok, data, ev, log))))  # fmt: skip
        steps.append(("generated refusals", lambda: add_rows(*_refusal_generation_evals(model, tok, data, ev, log))))  # fmt: skip
    if ev.n_ood:

        def ood() -> None:
            rows, result.bins = _ood_evals(model, tok, data, ev, log)
            add_rows(rows)

        steps.append(("OOD multiple choice", ood))
    if ev.plasticity_steps:

        def plasticity() -> None:
            rows, result.plasticity = _plasticity_evals(model, tok, config, data, log)
            add_rows(rows)

        steps.append(("plasticity", plasticity))
    _run_steps_with_progress(steps, progress)
    return result


def _run_steps_with_progress(
    steps: list[tuple[str, Callable[[], None]]], progress: ProgressFn | None
) -> None:
    """Run named steps in order; with ``progress``, report (i + batches done / batches) / n
    from the batch reports of :mod:`collapse_core.monitor`. Unnamed steps count for nothing."""
    named = [name for name, _ in steps if name]
    done = 0
    for name, step in steps:
        if progress is None or not name:
            step()
            continue
        i, reached = done, [0.0]

        def on_batch(
            label: str, k: int, total: int, i: int = i, name: str = name, reached: list = reached
        ) -> None:
            # a step may run several batch loops (plasticity: train, then score): never go back
            reached[0] = max(reached[0], k / max(total, 1))
            progress((i + reached[0]) / len(named), f"{name} · {label} {k + 1}/{total}")

        progress(i / len(named), name)
        with watching(on_batch=on_batch):
            step()
        done += 1
    if progress is not None and named:
        progress(1.0, "evaluations done")


def _probe_all(
    loaded: Any,
    config: RunConfig,
    store: Store,
    extra: dict,
    log: LogFn,
    progress: ProgressFn | None = None,
) -> None:
    """Probe the checkpoint on every ``[eval] probe_sets`` set; ``progress`` as in
    :func:`evaluate_checkpoint` (one step per set, split by its batches)."""
    from .probing import probe

    pcfg = config.probe.probe_config(max_prompts=config.eval.probe_max_prompts)
    sets = config.eval.probe_sets
    for i, name in enumerate(sets):

        def batches(done: int, total: int, i: int = i, name: str = name) -> None:
            if progress is not None:
                progress((i + done / max(total, 1)) / len(sets), f"probe {name} · {done}/{total}")  # fmt: skip

        result = probe(loaded, name, pcfg, store=store, checkpoint_extra=extra, progress=batches)
        erank = result.metrics["effective_rank"]
        log(f"probe {name}: effective rank mid {erank.iloc[len(erank) // 2]:.1f}, "
            f"last {erank.iloc[-1]:.1f}")  # fmt: skip


def _within(progress: ProgressFn, lo: float, hi: float, prefix: str) -> ProgressFn:
    """A progress callback for a sub-step that reports fractions in [0, 1], mapped onto
    [lo, hi] of the run's progress, its messages prefixed with ``prefix``."""
    return lambda fraction, message: progress(lo + (hi - lo) * fraction, f"{prefix}: {message}")


# -- commit step -------------------------------------------------------------------------------


def _frame(rows: list, **keys: Any) -> pd.DataFrame:
    """Typed rows as a table frame, every row prefixed with the same key columns."""
    return pd.DataFrame([{**keys, **asdict(row)} for row in rows])


def _commit_stage(
    store: Store,
    plan: RunPlan,
    loaded: Any,
    record: StageRecord,
    evals: CheckpointEvals,
    lora_rows: list[LoraMetricRow],
) -> None:
    """Write a finished stage in one transaction: evals, bins, generations, LoRA metrics, then
    the marker. ``evals.generations=None`` keeps the checkpoint's stored generations."""
    ckpt = loaded.checkpoint_id
    losses = record.train_losses
    with store.transaction() as con:
        # The run claim keeps a second process away; this keeps a stale claim's owner, or any
        # other writer, from storing a committed stage twice.
        if con.execute("SELECT 1 FROM stages WHERE run_id = ? AND stage_index = ?",
                       [plan.run_id, record.index]).fetchall():  # fmt: skip
            raise CollapseError(
                f"stage {record.index} ({record.stage}) of {plan.run_id} was already committed "
                "by another process; nothing was stored twice"
            )
        store.upsert_checkpoint(con, loaded.checkpoint_row())
        con.execute("DELETE FROM evals WHERE run_id = ? AND stage = ? AND checkpoint_id = ?",
                    [plan.run_id, record.label, ckpt])  # fmt: skip
        store.insert_df(con, "evals", _frame(evals.rows, run_id=plan.run_id, checkpoint_id=ckpt,
                                             stage=record.label))  # fmt: skip
        if evals.generations is not None:
            con.execute("DELETE FROM generations WHERE checkpoint_id = ?", [ckpt])
            store.insert_df(con, "generations", _frame(evals.generations, checkpoint_id=ckpt))
        con.execute("DELETE FROM calibration_bins WHERE checkpoint_id = ?", [ckpt])
        store.insert_df(con, "calibration_bins", _frame(evals.bins, checkpoint_id=ckpt))
        store.insert_df(con, "lora_metrics", _frame(lora_rows, run_id=plan.run_id))
        con.execute(
            "INSERT INTO stages (run_id, stage_index, stage, checkpoint_id, adapter_path, steps, "
            "train_loss_first, train_loss_last, seconds, created_at, method) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [plan.run_id, record.index, record.stage, ckpt, record.adapter_path, record.steps,
             losses[0] if losses else None, losses[-1] if losses else None, record.seconds,
             dt.datetime.now(), record.method],
        )  # fmt: skip


def _reuse_base_evals(store: Store, plan: RunPlan, checkpoint_id: str) -> CheckpointEvals | None:
    """Evals of the same starting checkpoint by another run of this study with the same seed
    and order (arms of a comparison share their start; its evals are deterministic)."""
    donors = store.query(
        "SELECT s.run_id FROM stages s JOIN runs r USING (run_id) WHERE r.study_id = ? AND "
        "r.seed = ? AND r.stage_order = ? AND s.stage_index = 0 AND s.checkpoint_id = ? "
        "AND s.run_id <> ? LIMIT 1",
        [plan.study_id, plan.seed, ",".join(plan.order), checkpoint_id, plan.run_id],
    )
    if donors.empty:
        return None
    rows = store.query(
        "SELECT eval, metric, value, n, ci_low, ci_high, ci_method FROM evals "
        "WHERE run_id = ? AND stage = '0:base'",
        [donors["run_id"][0]],
    ).to_dict("records")
    for r in rows:  # NULL columns (older rows) come back as NaN
        for k in ("n", "ci_low", "ci_high", "ci_method"):
            r[k] = None if pd.isna(r[k]) else (int(r[k]) if k == "n" else r[k])
    bins = store.query(
        "SELECT eval, bin, lower, upper, count, mean_confidence, accuracy FROM calibration_bins "
        "WHERE checkpoint_id = ?",
        [checkpoint_id],
    ).to_dict("records")
    return CheckpointEvals(rows=[EvalRow(**r) for r in rows],
                           bins=[CalibrationBin(**b) for b in bins],
                           plasticity={}, generations=None)  # fmt: skip


# -- training steps ----------------------------------------------------------------------------


@dataclass
class _RunSteps:
    """What every step of one run shares: the plan, its config and store, the seed's data,
    the arm's interventions, the callbacks, and the LoRA-update history of finished stages."""

    plan: RunPlan
    config: RunConfig
    store: Store
    data: StageData
    interventions: Any
    progress: ProgressFn
    log: LogFn
    should_stop: Callable[[], bool] | None
    on_commit: Callable[[int], None] | None = None
    adapter_paths: list[str] = field(default_factory=list)
    stage_deltas: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)

    @property
    def n_units(self) -> int:
        """Progress units: the starting checkpoint plus one per stage."""
        return len(self.plan.order) + 1

    def commit(self, loaded: Any, record: StageRecord, evals: CheckpointEvals,
               lora_rows: list[LoraMetricRow]) -> None:  # fmt: skip
        """The commit step, then ``on_commit(index)`` (the Ray executor writes the stage's
        segment there, before the previous merged checkpoint is removed)."""
        _commit_stage(self.store, self.plan, loaded, record, evals, lora_rows)
        if self.on_commit is not None:
            self.on_commit(record.index)

    def stage_dir(self, name: str) -> Path:
        """A folder of this run's data (adapters, merged checkpoints)."""
        return run_dir(self.plan.run_id) / name


@dataclass(frozen=True)
class TrainedStage:
    """A trained, merged and saved stage, before its checkpoint is probed and evaluated."""

    merged_path: Path
    adapter_path: Path | None  # None for a full-FT stage
    train_losses: tuple[float, ...]
    steps: int
    lora_rows: list[LoraMetricRow]
    method: str = "lora"


def _stage_train_config(config: RunConfig, seed: int, index: int) -> Any:
    """The TrainConfig of stage ``index`` (its own seed, so stages differ deterministically)."""
    return config.train.stage_config(seed=seed * 1000 + index)


def _stage_tags(plan: RunPlan, index: int, stage: str) -> dict[str, Any]:
    """The run/stage fields stored with a stage's checkpoint and its probes."""
    return {"run_id": plan.run_id, "stage": stage, "stage_index": index}


def _load_checkpoint(steps: _RunSteps, source: str, index: int, stage: str) -> Any:
    """Load a run's checkpoint, tagged with the run and stage it belongs to."""
    from .models import load_model

    loaded = load_model(source, device=steps.config.device, verbose=False)
    loaded.extra.update(_stage_tags(steps.plan, index, stage))
    return loaded


def _start_from_base(steps: _RunSteps) -> Any:
    """Stage 0: probe and evaluate the starting checkpoint (or reuse a sibling run's evals)
    and commit it. Returns the loaded checkpoint."""
    plan, log = steps.plan, steps.log
    log(f"{plan.name}: starting checkpoint")
    started = time.perf_counter()
    loaded = _load_checkpoint(steps, steps.config.model, 0, "base")
    unit = 1 / steps.n_units  # stage 0's share of the run: probe 20 %, evaluations 80 %
    _probe_all(loaded, steps.config, steps.store, _stage_tags(plan, 0, "base"), log,
               _within(steps.progress, 0.0, 0.2 * unit, "base"))  # fmt: skip
    evals = _reuse_base_evals(steps.store, plan, loaded.checkpoint_id)
    if evals is not None:
        log("starting checkpoint already evaluated in this study (same seed): reused")
    else:
        evals = evaluate_checkpoint(loaded, steps.config, steps.data, plan.order, log,
                                    _within(steps.progress, 0.2 * unit, unit, "base"))  # fmt: skip
    record = StageRecord(0, "base", None, 0, (), time.perf_counter() - started)
    steps.commit(loaded, record, evals, [])
    return loaded


def _resume_after(steps: _RunSteps, done: pd.DataFrame) -> Any:
    """Reload the last finished stage's checkpoint and the LoRA-update history of the
    finished stages (for subspace comparisons with earlier stages)."""
    from .models import load_model

    last = int(done.iloc[-1]["stage_index"])
    source = steps.config.model if last == 0 else str(steps.stage_dir(f"stage{last}"))
    steps.log(f"{steps.plan.name}: resuming after stage {last} ({done.iloc[-1]['stage']})")
    loaded = load_model(source, device=steps.config.device, verbose=False)
    for row in done.itertuples():
        label = f"{row.stage_index}:{row.stage}"
        if isinstance(row.adapter_path, str) and Path(row.adapter_path).exists():
            steps.adapter_paths.append(row.adapter_path)
            steps.stage_deltas[label] = _load_deltas(row.adapter_path)
        elif (delta_file := _delta_file(steps, row.stage_index, row.stage)).exists():
            steps.stage_deltas[label] = _load_full_deltas(delta_file)
    return loaded


def _train(steps: _RunSteps, loaded: Any, index: int, stage: str, tcfg: Any) -> Any:
    """Train one LoRA stage on the loaded checkpoint with the arm's interventions."""
    from .train import train_stage

    examples = steps.data.get(stage, "train", steps.config.train.n_train)
    steps.interventions.bind(loaded.tokenizer, steps.adapter_paths)
    steps.interventions.before_stage(loaded.model, index, stage)
    objective = STAGE_OBJECTIVES[stage]

    def train_progress(step: int, total: int, loss: float) -> None:
        steps.progress((index + 0.7 * step / total) / steps.n_units,
                       f"{stage}: step {step}/{total} loss {loss:.3f}")  # fmt: skip

    result = train_stage(
        loaded.model, loaded.tokenizer, examples, objective, tcfg,
        hooks=steps.interventions.hooks(index, stage), progress=train_progress,
        should_stop=steps.should_stop,
    )  # fmt: skip
    if result.stopped:
        raise Cancelled("run cancelled mid-stage; finished stages are kept")
    return result


def _save_and_merge(steps: _RunSteps, result: Any, index: int, stage: str) -> tuple[Path, Any]:
    """LoRA: save the stage's adapter and merge it: (adapter path, merged model)."""
    from .train.lora import merge_and_unload, save_adapter

    peft_model = result.peft_model
    adapter_path = steps.stage_dir(f"stage{index}_{stage}_adapter")
    save_adapter(peft_model, adapter_path)
    steps.adapter_paths.append(str(adapter_path))
    steps.interventions.after_stage_adapter(peft_model, index, stage)
    merged = merge_and_unload(peft_model)
    steps.interventions.after_stage(merged, index, stage)
    return adapter_path, merged


def _delta_file(steps: _RunSteps, index: int, stage: str) -> Path:
    """Where a full-FT stage keeps its ΔW (the LoRA adapter's counterpart, for resuming)."""
    return steps.stage_dir(f"stage{index}_{stage}_delta.safetensors")


def _keep_full(steps: _RunSteps, result: Any, index: int, stage: str) -> tuple[None, Any]:
    """Full FT: the trained model is the next checkpoint as it is (no adapter, no merge); its
    ΔW is saved (safetensors, written to a temporary name and renamed) for resuming."""
    from safetensors.numpy import save_file

    path = _delta_file(steps, index, stage)
    tmp = path.with_name(path.name + ".tmp")
    save_file({m: np.ascontiguousarray(d) for m, d in result.deltas.items()}, str(tmp))
    tmp.replace(path)
    steps.interventions.after_stage(result.peft_model, index, stage)
    return None, result.peft_model


def _lora_update_rows(
    stage_deltas: dict[str, dict[str, np.ndarray]],
    merged: Any,
    label: str,
    max_rank: int | None = None,
) -> list[LoraMetricRow]:
    """Weight-update metrics of stage ``label`` (the last in ``stage_deltas``) against earlier
    ones, for a LoRA or a full-FT ΔW alike; ``max_rank`` caps the compared subspaces."""
    from .train.lora import module_weight
    from .train.lora_metrics import lora_update_metrics

    # Intruder dimensions compare with this stage's starting weights W0 = W_merged − ΔW.
    start_weights = {m: module_weight(merged, m) - d for m, d in stage_deltas[label].items()}
    history = lora_update_metrics(
        stage_deltas, start_weights, len(stage_deltas) - 1, only_stage=label, max_rank=max_rank
    )
    return [LoraMetricRow(**r) for r in history if r["stage"] == label]


def _train_and_merge(steps: _RunSteps, loaded: Any, index: int, stage: str) -> TrainedStage:
    """Train; LoRA: save the adapter and merge, full FT: save ΔW; measure the update and save
    the stage's weights.

    The models stay local here, so the caller can free the old checkpoint before loading the
    saved one."""
    tcfg = _stage_train_config(steps.config, steps.plan.seed, index)
    result = _train(steps, loaded, index, stage, tcfg)
    finish = _keep_full if tcfg.method == "full" else _save_and_merge
    adapter_path, merged = finish(steps, result, index, stage)
    label = f"{index}:{stage}"
    steps.stage_deltas[label] = result.deltas
    # Subspaces of rank ≤ lora_r: a LoRA ΔW has at most that rank; a full-FT ΔW is compared on
    # its top lora_r directions (its full column space would overlap every other trivially).
    lora_rows = _lora_update_rows(steps.stage_deltas, merged, label, max_rank=tcfg.lora_r)
    path = _save_merged(merged, loaded.tokenizer, steps.stage_dir(f"stage{index}"))
    return TrainedStage(path, adapter_path, tuple(result.losses), tcfg.steps, lora_rows,
                        tcfg.method)  # fmt: skip


def _drop_previous_merged(steps: _RunSteps, index: int) -> None:
    """Only the last merged checkpoint is needed to resume (unless ``[run] keep_all``)."""
    previous = steps.stage_dir(f"stage{index - 1}")
    if index > 1 and previous.exists() and not steps.config.keep_all:
        shutil.rmtree(previous, ignore_errors=True)


def _save_merged(model: Any, tokenizer: Any, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def _prepare_run(
    plan: RunPlan,
    config: RunConfig,
    store: Store,
    progress: ProgressFn,
    log: LogFn,
    should_stop: Callable[[], bool] | None,
) -> tuple[_RunSteps, pd.DataFrame]:
    """Seed, mark the run running, set up its data and interventions; returns the shared step
    state and the run's finished stages."""
    from .interventions import build_interventions

    torch.manual_seed(plan.seed)
    np.random.seed(plan.seed)
    done = finished_stages(store, plan.run_id)
    store.execute("UPDATE runs SET status = 'running' WHERE run_id = ?", [plan.run_id])
    data = StageData(config, plan.seed)
    interventions = build_interventions(plan.arm, config.interventions, data, plan.order)
    steps = _RunSteps(plan, config, store, data, interventions, progress, log, should_stop)
    return steps, done


def execute_run(
    plan: RunPlan,
    config: RunConfig,
    store: Store,
    progress: ProgressFn = _silent,
    log: LogFn = _silent,
    should_stop: Callable[[], bool] | None = None,
    on_commit: Callable[[int], None] | None = None,
) -> None:
    """Run (or resume) one (order, seed, arm): see the module docstring. ``on_commit(index)``
    runs right after stage ``index`` is committed."""
    steps, done = _prepare_run(plan, config, store, progress, log, should_stop)
    steps.on_commit = on_commit
    if done.empty:
        loaded = _start_from_base(steps)
        start_index = 1
    else:
        start_index = int(done.iloc[-1]["stage_index"]) + 1
        if start_index > len(plan.order):
            store.execute("UPDATE runs SET status = 'done' WHERE run_id = ?", [plan.run_id])
            log(f"{plan.name}: already complete")
            return
        loaded = _resume_after(steps, done)
    progress(start_index / steps.n_units, "training")

    for index in range(start_index, len(plan.order) + 1):
        if should_stop is not None and should_stop():
            raise Cancelled("run cancelled; finished stages are kept and can be resumed")
        stage = plan.order[index - 1]
        log(f"stage {index}/{len(plan.order)}: {stage} ({plan.arm})")
        started = time.perf_counter()
        trained = _train_and_merge(steps, loaded, index, stage)
        del loaded  # free the pre-merge checkpoint before loading the merged one
        gc.collect()
        loaded = _load_checkpoint(steps, str(trained.merged_path), index, stage)
        unit = 1 / steps.n_units
        _probe_all(loaded, config, store, _stage_tags(plan, index, stage), log,
                   _within(progress, (index + 0.7) * unit, (index + 0.8) * unit, stage))  # fmt: skip
        evals = evaluate_checkpoint(loaded, config, steps.data, plan.order, log,
                                    _within(progress, (index + 0.8) * unit, (index + 1) * unit, stage))  # fmt: skip
        adapter = str(trained.adapter_path) if trained.adapter_path is not None else None
        record = StageRecord(index, stage, adapter, trained.steps, trained.train_losses,
                             time.perf_counter() - started, trained.method)  # fmt: skip
        steps.commit(loaded, record, evals, trained.lora_rows)
        _drop_previous_merged(steps, index)
        progress((index + 1) / steps.n_units, f"{stage} done")
        log(f"stage {stage} done in {record.seconds:.0f} s")
    store.execute(
        "UPDATE runs SET status = 'done', finished_at = ? WHERE run_id = ?",
        [dt.datetime.now(), plan.run_id],
    )
    if config.eval.queue_embeddings:
        _queue_trajectory_map(store, plan, config, loaded.n_layers, log)


def _queue_trajectory_map(
    store: Store, plan: RunPlan, config: RunConfig, n_layers: int, log: LogFn
) -> None:
    """Queue the AlignedUMAP across stages at the middle layer (UMAP costs tens of seconds, so
    it runs in a worker, never inside a page); the app's worker or `collapse_core worker` runs it."""
    from .embeddings import EmbeddingSpec, submit

    spec = EmbeddingSpec(mode="stages", probe_sets=(config.eval.probe_sets[0],),
                         run_id=plan.run_id, layer=n_layers // 2)  # fmt: skip
    try:
        job_id = submit(store, spec)
        log(f"queued token-trajectory map (job {job_id}); run `python -m collapse_core worker`")
    except CollapseError as err:
        log(f"trajectory map not queued: {err}")


def _load_deltas(adapter_path: str) -> dict[str, np.ndarray]:
    from .train.lora import delta_arrays, load_adapter_deltas

    return delta_arrays(load_adapter_deltas(adapter_path))


def _load_full_deltas(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


def run_study(
    config: RunConfig,
    store: Store,
    progress: ProgressFn = _silent,
    log: LogFn = _silent,
    should_stop: Callable[[], bool] | None = None,
    job_id: str | None = None,
) -> str:
    """Run (or resume) every run of a study; returns the study id.

    Each run is claimed by this process for its duration (:func:`runclaims.claimed`) and its
    status recorded (:func:`lifecycle.recorded_run`: ``done``/``cancelled``/``interrupted``/
    ``failed``, never a stale ``running``);
    ``should_stop`` and the run's own cancel flag are checked between batches
    (:mod:`collapse_core.monitor`). On a cancel the study's runs not yet started are cancelled."""
    check_before_writing(config)
    plans = plan_runs(config)
    _register(store, config, plans)
    waiting = list(enumerate(plans))
    announced: set[str] = set()
    while waiting:
        held_elsewhere = []
        for i, plan in waiting:
            if _is_complete(store, plan):  # a rerun touches nothing, not even the runs row
                log(f"{plan.name}: already complete")
                continue
            with claimed(store, plan.run_id) as claim:
                if claim.held:
                    try:
                        _run_owned(plan, config, store, i, len(plans), progress, log,
                                   should_stop, job_id)  # fmt: skip
                    except Cancelled:  # the study's runs not started yet are cancelled too
                        cancel_waiting_runs(store, [p.run_id for _, p in waiting])
                        raise
                    continue
            held_elsewhere.append((i, plan))
            if plan.run_id not in announced:
                announced.add(plan.run_id)
                log(f"{plan.name}: being run by {claim.holder}; coming back to it afterwards")
        if held_elsewhere:
            # Runs another process holds: wait for it to finish them (then execute_run finds
            # them complete) or to die (then its claim goes stale and this process resumes).
            if should_stop is not None and should_stop():
                cancel_waiting_runs(store, [p.run_id for _, p in held_elsewhere])
                raise Cancelled("study cancelled; finished stages are kept")
            time.sleep(CLAIM_POLL_S)
        waiting = held_elsewhere
    return plans[0].study_id


def _is_complete(store: Store, plan: RunPlan) -> bool:
    """True when the run is ``done`` and holds every stage of its order (base included)."""
    status = store.query("SELECT status FROM runs WHERE run_id = ?", [plan.run_id])
    if status.empty or status["status"].iloc[0] != "done":
        return False
    return len(finished_stages(store, plan.run_id)) == len(plan.order) + 1


def _run_owned(
    plan: RunPlan,
    config: RunConfig,
    store: Store,
    i: int,
    n_runs: int,
    progress: ProgressFn,
    log: LogFn,
    should_stop: Callable[[], bool] | None,
    job_id: str | None,
) -> None:
    """One run of a study whose claim this process holds: its status, progress line and cancel
    flag recorded (:func:`lifecycle.recorded_run`), cancel checked between batches."""
    with recorded_run(store, plan.run_id, job_id) as claim:

        def run_progress(fraction: float, message: str) -> None:
            claim.progress(fraction, message)
            progress((i + fraction) / n_runs, f"run {i + 1}/{n_runs}: {message}")

        def stop() -> bool:
            return bool(should_stop is not None and should_stop()) or claim.should_stop()

        with watching(should_stop=stop):
            execute_run(plan, config, store, run_progress, log, stop)
