"""Sequential post-training runs: train stage after stage, probe and evaluate every checkpoint.

Read top to bottom, one run is::

    base checkpoint ── probe + evals ──► stage 1 (LoRA train → save adapter → merge) ── probe +
    evals + LoRA-update metrics ──► stage 2 ... ──► last stage

A stage is committed to the ``stages`` table only after its checkpoint, probes, evals and LoRA
metrics are stored, so a killed run resumes from the last finished stage: the merged weights of
every finished stage are kept under ``data/runs/<run_id>/``.

A study = one config × its orders × seeds × intervention arms; every (order, seed, arm) is a run.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from .errors import CollapseError
from .paths import data_dir
from .runconfig import RunConfig
from .store import Store, dumps

ProgressFn = Callable[[float, str], None]
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
    """Deterministic study id: hash of the config (so rerunning the same file resumes it)."""
    return "study-" + hashlib.sha256(dumps(config.raw).encode()).hexdigest()[:10]


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
    """Where a run keeps adapters and merged checkpoints."""
    path = data_dir() / "runs" / run_id
    path.mkdir(parents=True, exist_ok=True)
    return path


def _register(store: Store, config: RunConfig, plans: list[RunPlan]) -> None:
    now = dt.datetime.now()
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
                "INSERT INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, 'pending', ?, NULL)",
                [plan.run_id, sid, plan.name, plan.arm, plan.seed, ",".join(plan.order),
                 dumps(config.raw), now],
            )  # fmt: skip


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


def evaluate_checkpoint(
    loaded: Any, config: RunConfig, data: StageData, order: list[str], log: LogFn = _silent
) -> tuple[list[dict], list[dict], dict, list[dict]]:
    """All evaluations of one checkpoint: (eval rows, calibration bin rows, plasticity dict,
    generation rows: one per generated HumanEval solution, with its sandbox status)."""
    from . import evals as E
    from .train import TrainConfig

    model, tok = loaded.model, loaded.tokenizer
    ev = config.eval
    rows: list[dict] = []
    n = ev["n_heldout"]
    domains = config.raw.get("eval", {}).get("heldout_domains", "all")
    domains = list(dict.fromkeys(order)) if domains == "order" else list(dict.fromkeys(
        [*order, *[s for s in ("sft", "dpo", "safety", "math", "code", "long_cot")]]
    ))  # fmt: skip
    bs = ev["batch_size"]
    if n:
        for stage in domains:
            examples = data.get(stage, "heldout", n)
            if stage == "dpo":
                acc = E.dpo_preference_accuracy(model, tok, examples, batch_size=bs)
                rows.append({"eval": "dpo", "metric": "preference_accuracy", "value": acc})
                sft_like = [e.__class__(prompt=e.prompt, response=e.chosen, meta=e.meta)
                            for e in examples]  # fmt: skip
                loss = E.heldout_loss(model, tok, sft_like, batch_size=bs)
            else:
                loss = E.heldout_loss(model, tok, examples, batch_size=bs)
            rows.append({"eval": stage, "metric": "heldout_loss", "value": loss})
            if stage == "safety":
                rates = E.refusal_rate(model, tok, examples, batch_size=bs)
                rows.append(
                    {"eval": "safety", "metric": "refusal_rate", "value": rates["refusal_rate"]}
                )
                rows.append({"eval": "safety", "metric": "over_refusal_rate", "value": rates["over_refusal_rate"]})  # fmt: skip
                # Continuous margins (refusal − compliance log-prob per token) move even when
                # the binary rates sit at 0 after short LoRA stages.
                for key in ("refusal_margin_harmful", "refusal_margin_benign"):
                    if key in rates and rates[key] == rates[key]:
                        rows.append({"eval": "safety", "metric": key, "value": float(rates[key])})
            if stage in ("math", "long_cot"):
                acc = E.answer_accuracy(model, tok, examples, batch_size=bs)
                rows.append({"eval": stage, "metric": "answer_accuracy", "value": acc})
        log(f"held-out evals on {len(domains)} domains done")
    samples: list[dict] = []
    if ev.get("generation_n"):
        # load_stage("code") draws half HumanEval (with tests) and half CodeI/O items.
        problems = [e for e in data.get("code", "heldout", 2 * ev["generation_n"])
                    if e.meta.get("entry_point")][: ev["generation_n"]]  # fmt: skip
        gen = E.code_pass_at_1(
            model, tok, problems, max_new_tokens=ev["max_new_tokens"], batch_size=bs
        )
        rows.append({"eval": "code", "metric": "pass_at_1", "value": gen["pass_at_1"]})
        rows.append({"eval": "code", "metric": "pass_at_1_timeouts", "value": gen["timeouts"]})
        samples = [{"eval": "code_pass_at_1", "item_id": r["task_id"], "status": r["status"],
                    "prompt": r["prompt"], "response": r["response"], "program": r["code"]}
                   for r in gen["results"]]  # fmt: skip
        log(f"code pass@1 {gen['pass_at_1']:.3f} on {gen['n']} HumanEval problems")
        safety = data.get("safety", "heldout", max(ev["n_heldout"], 2 * ev["generation_n"]))
        said = E.generated_refusal_rate(model, tok, safety, batch_size=bs)
        for key in ("refusal_rate", "over_refusal_rate"):
            if said[key] == said[key]:
                rows.append({"eval": "safety", "metric": f"generated_{key}", "value": said[key]})
        samples += [{"eval": "safety_refusal", "item_id": f"{'harmful' if r['harmful'] else 'benign'}-{i}",
                     "status": "refused" if r["refused"] else "answered", "prompt": r["prompt"],
                     "response": r["response"], "program": ""}
                    for i, r in enumerate(said["results"])]  # fmt: skip
        log(f"generated refusal rate {said['refusal_rate']:.3f}, "
            f"over-refusal {said['over_refusal_rate']:.3f}")  # fmt: skip
    bins: list[dict] = []
    if ev["n_ood"]:
        items = data.ood(ev["n_ood"])
        mc = E.multiple_choice_eval(model, tok, items, batch_size=bs)
        for metric in ("accuracy", "nll", "ece", "mce", "brier"):
            rows.append({"eval": "ood", "metric": metric, "value": float(mc[metric])})
        bins = [{**b, "eval": "ood"} for b in mc["reliability_bins"]]
        log(f"OOD accuracy {mc['accuracy']:.3f}, ECE {mc['ece']:.3f}")
    plast: dict = {}
    if ev["plasticity_steps"]:
        train_ex = data.plasticity("train", ev["plasticity_n"])
        eval_ex = data.plasticity("heldout", max(8, ev["plasticity_n"] // 4))
        tcfg = TrainConfig(
            steps=ev["plasticity_steps"], batch_size=config.train["batch_size"],
            lr=config.train["lr"], lora_r=config.train["lora_r"],
            lora_alpha=config.train["lora_alpha"], max_length=config.train["max_length"],
            seed=data.seed,
        )  # fmt: skip
        plast = E.plasticity(model, tok, train_ex, eval_ex, ev["plasticity_steps"], tcfg)
        rows.append({"eval": "plasticity", "metric": "auc", "value": plast["auc"]})
        rows.append({"eval": "plasticity", "metric": "final_loss", "value": plast["final_loss"]})
        log(f"plasticity AUC {plast['auc']:.3f}")
    return rows, bins, plast, samples


def _probe_all(loaded: Any, config: RunConfig, store: Store, extra: dict, log: LogFn) -> None:
    from .probing import ProbeConfig, probe

    pcfg = ProbeConfig(
        max_length=config.probe["max_length"],
        n_samples=config.probe["n_samples"],
        batch_size=config.probe["batch_size"],
        max_prompts=config.eval["probe_max_prompts"],
    )
    for name in config.eval["probe_sets"]:
        result = probe(loaded, name, pcfg, store=store, checkpoint_extra=extra)
        erank = result.metrics["effective_rank"]
        log(f"probe {name}: effective rank mid {erank.iloc[len(erank) // 2]:.1f}, "
            f"last {erank.iloc[-1]:.1f}")  # fmt: skip


def _commit_stage(
    store: Store,
    plan: RunPlan,
    index: int,
    stage: str,
    loaded: Any,
    eval_rows: list[dict],
    bins: list[dict],
    lora_rows: list[dict],
    adapter_path: str | None,
    train_losses: list[float],
    seconds: float,
    steps: int,
    samples: list[dict] | None = None,
) -> None:
    """Write a finished stage in one transaction: evals, bins, generations, LoRA metrics, then
    the marker. ``samples=None`` keeps the checkpoint's stored generations (reused base evals)."""
    ckpt = loaded.checkpoint_id
    with store.transaction() as con:
        store.upsert_checkpoint(con, loaded.checkpoint_row())
        con.execute("DELETE FROM evals WHERE run_id = ? AND stage = ? AND checkpoint_id = ?",
                    [plan.run_id, f"{index}:{stage}", ckpt])  # fmt: skip
        store.insert_df(
            con, "evals",
            pd.DataFrame([{"run_id": plan.run_id, "checkpoint_id": ckpt,
                           "stage": f"{index}:{stage}", **r} for r in eval_rows]),
        )  # fmt: skip
        if samples is not None:
            con.execute("DELETE FROM generations WHERE checkpoint_id = ?", [ckpt])
            store.insert_df(
                con, "generations", pd.DataFrame([{"checkpoint_id": ckpt, **r} for r in samples])
            )
        con.execute("DELETE FROM calibration_bins WHERE checkpoint_id = ?", [ckpt])
        store.insert_df(
            con, "calibration_bins", pd.DataFrame([{"checkpoint_id": ckpt, **b} for b in bins])
        )
        if lora_rows:
            store.insert_df(
                con, "lora_metrics", pd.DataFrame([{"run_id": plan.run_id, **r} for r in lora_rows])
            )
        con.execute(
            "INSERT INTO stages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [plan.run_id, index, stage, ckpt, adapter_path, steps,
             train_losses[0] if train_losses else None,
             train_losses[-1] if train_losses else None, seconds, dt.datetime.now()],
        )  # fmt: skip


def _reuse_base_evals(
    store: Store, plan: RunPlan, checkpoint_id: str
) -> tuple[list[dict], list[dict]] | None:
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
        "SELECT eval, metric, value FROM evals WHERE run_id = ? AND stage = '0:base'",
        [donors["run_id"][0]],
    ).to_dict("records")
    bins = store.query(
        "SELECT eval, bin, lower, upper, count, mean_confidence, accuracy FROM calibration_bins "
        "WHERE checkpoint_id = ?",
        [checkpoint_id],
    ).to_dict("records")
    return rows, bins


def _save_merged(model: Any, tokenizer: Any, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    return path


def execute_run(
    plan: RunPlan,
    config: RunConfig,
    store: Store,
    progress: ProgressFn = _silent,
    log: LogFn = _silent,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Run (or resume) one (order, seed, arm): see the module docstring."""
    from .interventions import build_interventions
    from .models import load_model
    from .train import TrainConfig, train_stage
    from .train.lora import lora_deltas, merge_and_unload, save_adapter
    from .train.lora_metrics import lora_update_metrics

    torch.manual_seed(plan.seed)
    np.random.seed(plan.seed)
    done = finished_stages(store, plan.run_id)
    n_units = len(plan.order) + 1
    store.execute("UPDATE runs SET status = 'running' WHERE run_id = ?", [plan.run_id])
    data = StageData(config, plan.seed)
    interventions = build_interventions(plan.arm, config.interventions, data, plan.order)
    stage_deltas: dict[str, dict[str, np.ndarray]] = {}
    adapter_paths: list[str] = []

    if done.empty:
        log(f"{plan.name}: starting checkpoint")
        loaded = load_model(config.model, device=config.device, verbose=False)
        extra = {"run_id": plan.run_id, "stage": "base", "stage_index": 0}
        loaded.extra.update(extra)
        _probe_all(loaded, config, store, extra, log)
        reused = _reuse_base_evals(store, plan, loaded.checkpoint_id)
        samples: list[dict] | None = None
        if reused is not None:
            rows, bins = reused
            log("starting checkpoint already evaluated in this study (same seed): reused")
        else:
            rows, bins, _, samples = evaluate_checkpoint(loaded, config, data, plan.order, log)
        _commit_stage(store, plan, 0, "base", loaded, rows, bins, [], None, [], 0.0, 0, samples)
        start_index = 1
    else:
        last = done.iloc[-1]
        start_index = int(last["stage_index"]) + 1
        path = run_dir(plan.run_id) / f"stage{int(last['stage_index'])}"
        if start_index > len(plan.order):
            store.execute("UPDATE runs SET status = 'done' WHERE run_id = ?", [plan.run_id])
            log(f"{plan.name}: already complete")
            return
        source = config.model if int(last["stage_index"]) == 0 else str(path)
        log(f"{plan.name}: resuming after stage {int(last['stage_index'])} ({last['stage']})")
        loaded = load_model(source, device=config.device, verbose=False)
        # LoRA-update history for subspace comparisons with earlier stages.
        for row in done.itertuples():
            if isinstance(row.adapter_path, str) and Path(row.adapter_path).exists():
                adapter_paths.append(row.adapter_path)
                stage_deltas[f"{row.stage_index}:{row.stage}"] = _load_deltas(row.adapter_path)
    progress(start_index / n_units, "training")

    for index in range(start_index, len(plan.order) + 1):
        if should_stop is not None and should_stop():
            raise CollapseError("run cancelled; finished stages are kept and can be resumed")
        stage = plan.order[index - 1]
        log(f"stage {index}/{len(plan.order)}: {stage} ({plan.arm})")
        started = time.perf_counter()
        tcfg = TrainConfig(
            steps=config.train["steps"], batch_size=config.train["batch_size"],
            lr=config.train["lr"], lora_r=config.train["lora_r"],
            lora_alpha=config.train["lora_alpha"], max_length=config.train["max_length"],
            seed=plan.seed * 1000 + index, dpo_beta=config.train["dpo_beta"],
            **({"target_modules": tuple(config.train["target_modules"])}
               if config.train["target_modules"] else {}),
        )  # fmt: skip
        examples = data.get(stage, "train", config.train["n_train"])
        interventions.bind(loaded.tokenizer, adapter_paths)
        interventions.before_stage(loaded.model, index, stage)
        objective = "dpo" if stage == "dpo" else "sft"

        def train_progress(
            step: int, total: int, loss: float, index: int = index, stage: str = stage
        ) -> None:
            progress((index + 0.7 * step / total) / n_units, f"{stage}: step {step}/{total} "
                     f"loss {loss:.3f}")  # fmt: skip

        result = train_stage(
            loaded.model, loaded.tokenizer, examples, objective, tcfg,
            hooks=interventions.hooks(index, stage), progress=train_progress,
            should_stop=should_stop,
        )  # fmt: skip
        if result.stopped:
            raise CollapseError("run cancelled mid-stage; finished stages are kept")
        adapter_path = run_dir(plan.run_id) / f"stage{index}_{stage}_adapter"
        save_adapter(result.peft_model, adapter_path)
        adapter_paths.append(str(adapter_path))
        deltas = {m: d for m, d in _deltas_np(lora_deltas(result.peft_model)).items()}
        interventions.after_stage_adapter(result.peft_model, index, stage)
        merged = merge_and_unload(result.peft_model)
        interventions.after_stage(merged, index, stage)
        stage_deltas[f"{index}:{stage}"] = deltas
        from .train.lora import module_weight

        # Intruder dimensions compare with this stage's starting weights W0 = W_merged − ΔW.
        start_weights = {m: module_weight(merged, m) - d for m, d in deltas.items()}
        history = lora_update_metrics(
            stage_deltas, start_weights, len(stage_deltas) - 1, only_stage=f"{index}:{stage}"
        )
        lora_rows = [r for r in history
                     if r["stage"] == f"{index}:{stage}"]  # fmt: skip
        path = _save_merged(merged, loaded.tokenizer, run_dir(plan.run_id) / f"stage{index}")
        losses = list(result.losses)
        del loaded, merged, result
        gc.collect()
        loaded = load_model(str(path), device=config.device, verbose=False)
        extra = {"run_id": plan.run_id, "stage": stage, "stage_index": index}
        loaded.extra.update(extra)
        progress((index + 0.7) / n_units, f"{stage}: probing")
        _probe_all(loaded, config, store, extra, log)
        progress((index + 0.8) / n_units, f"{stage}: evaluating")
        rows, bins, _, samples = evaluate_checkpoint(loaded, config, data, plan.order, log)
        seconds = time.perf_counter() - started
        _commit_stage(store, plan, index, stage, loaded, rows, bins, lora_rows,
                      str(adapter_path), losses, seconds, tcfg.steps, samples)  # fmt: skip
        previous = run_dir(plan.run_id) / f"stage{index - 1}"
        if index > 1 and previous.exists() and not config.raw.get("run", {}).get("keep_all"):
            shutil.rmtree(previous, ignore_errors=True)  # only the last merged model is needed
        progress((index + 1) / n_units, f"{stage} done")
        log(f"stage {stage} done in {seconds:.0f} s")
    store.execute(
        "UPDATE runs SET status = 'done', finished_at = ? WHERE run_id = ?",
        [dt.datetime.now(), plan.run_id],
    )
    if config.eval.get("queue_embeddings", True):
        _queue_trajectory_map(store, plan, config, loaded.n_layers, log)


def _queue_trajectory_map(
    store: Store, plan: RunPlan, config: RunConfig, n_layers: int, log: LogFn
) -> None:
    """Queue the AlignedUMAP across stages at the middle layer (UMAP costs tens of seconds, so
    it runs in a worker, never inside a page); the app's worker or `collapse_core worker` runs it."""
    from .embeddings import EmbeddingSpec, submit

    spec = EmbeddingSpec(mode="stages", probe_sets=(config.eval["probe_sets"][0],),
                         run_id=plan.run_id, layer=n_layers // 2)  # fmt: skip
    try:
        job_id = submit(store, spec)
        log(f"queued token-trajectory map (job {job_id}); run `python -m collapse_core worker`")
    except CollapseError as err:
        log(f"trajectory map not queued: {err}")


def _deltas_np(deltas: dict) -> dict[str, np.ndarray]:
    from .train.lora import delta_weight

    out = {}
    for module, (a, b, scaling) in deltas.items():
        out[module] = delta_weight(a, b, scaling).detach().float().cpu().numpy()
    return out


def _load_deltas(adapter_path: str) -> dict[str, np.ndarray]:
    from .train.lora import load_adapter_deltas

    return _deltas_np(load_adapter_deltas(adapter_path))


def run_study(
    config: RunConfig,
    store: Store,
    progress: ProgressFn = _silent,
    log: LogFn = _silent,
    should_stop: Callable[[], bool] | None = None,
) -> str:
    """Run (or resume) every run of a study; returns the study id."""
    if config.eval.get("generation_n"):
        from .sandbox import require_isolation

        require_isolation()  # refuse before anything is written, not at the first eval
    plans = plan_runs(config)
    _register(store, config, plans)
    for i, plan in enumerate(plans):

        def run_progress(fraction: float, message: str, i: int = i) -> None:
            progress((i + fraction) / len(plans), f"run {i + 1}/{len(plans)}: {message}")

        execute_run(plan, config, store, run_progress, log, should_stop)
    return plans[0].study_id
