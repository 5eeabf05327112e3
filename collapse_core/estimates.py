"""How long a run will take, from the stage timings already stored (before it is started).

Every committed stage stores its wall seconds (``stages.seconds``): stage 0 (the starting
checkpoint) = probe + evaluations; stage k ≥ 1 = LoRA training + merge + probe + evaluations.
For runs of the same model (and, when there are any, the same ``[eval]``/``[probe]`` settings)
we take

    E = median seconds of stage 0                      (one checkpoint's probe + evals)
    c = median over stages k ≥ 1 of max(seconds_k − E, 0) / (steps_k × batch_k)
                                                       (seconds per training example-step)

and estimate one run of ``n`` stages as ``E + n · (E + steps · batch · c)``; a study multiplies
by its number of runs. With no stage 0 timing (databases from before it was stored) the median
seconds of the stored stages stands in for every stage. Machines and load differ, so this is a
rough guide, said with its basis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .store import Store, dumps


@dataclass(frozen=True)
class RunEstimate:
    """Estimated wall seconds (None when nothing comparable is stored) and what it rests on."""

    seconds: float | None
    basis: str


def _settings(config_json: str | None) -> tuple[str, str]:
    try:
        raw = json.loads(config_json or "{}")
    except json.JSONDecodeError:
        raw = {}
    run = raw.get("run", {}) if isinstance(raw, dict) else {}
    evals = {k: raw.get(k) or {} for k in ("eval", "probe")} if isinstance(raw, dict) else {}
    return str(run.get("model", "")), dumps(evals)


def stored_stage_timings(store: Store, model: str) -> pd.DataFrame:
    """Committed stages of runs of ``model``: run_id, stage_index, seconds, steps, batch_size,
    eval_settings (the run's ``[eval]`` and ``[probe]`` tables as canonical JSON)."""
    df = store.query(
        "SELECT s.run_id, s.stage_index, s.seconds, s.steps, r.config_json FROM stages s "
        "JOIN runs r USING (run_id) WHERE s.seconds IS NOT NULL"
    )
    if df.empty:
        return df.assign(batch_size=[], eval_settings=[])
    settings = [_settings(c) for c in df["config_json"]]
    df["model"] = [m for m, _ in settings]
    df["eval_settings"] = [e for _, e in settings]
    df["batch_size"] = [
        (json.loads(c or "{}").get("train") or {}).get("batch_size", 4) for c in df["config_json"]
    ]
    return df[df["model"] == model].drop(columns=["config_json", "model"]).reset_index(drop=True)


def estimate_run(
    store: Store,
    model: str,
    n_stages: int,
    steps: int,
    batch_size: int,
    n_runs: int = 1,
    eval_settings: dict | None = None,
) -> RunEstimate:
    """Estimated wall time of ``n_runs`` runs of ``n_stages`` stages (see module docstring)."""
    df = stored_stage_timings(store, model)
    if df.empty:
        return RunEstimate(None, f"no stored stage timings for {model} yet: the job shows an "
                                 "ETA once it is running")  # fmt: skip
    wanted = dumps({k: (eval_settings or {}).get(k) or {} for k in ("eval", "probe")})
    same = df[df["eval_settings"] == wanted]
    note = "same eval settings" if not same.empty else "other eval settings"
    df = same if not same.empty else df
    base = df[(df["stage_index"] == 0) & (df["seconds"] > 0)]["seconds"]
    trained = df[df["stage_index"] > 0]
    if base.empty:
        per_stage = (
            float(df[df["seconds"] > 0]["seconds"].median()) if (df["seconds"] > 0).any() else 0.0
        )
        seconds = (n_stages + 1) * per_stage * n_runs
        return RunEstimate(seconds, f"median of {len(df)} stored stages of {model} ({note}; "
                                    "training length not taken into account)")  # fmt: skip
    evals_s = float(base.median())
    if trained.empty:
        per_step = 0.0
        note += "; no trained stage stored, training time not counted"
    else:
        work = (trained["steps"].clip(lower=1) * trained["batch_size"].clip(lower=1)).astype(float)
        per_step = float(np.median((trained["seconds"] - evals_s).clip(lower=0) / work))
    seconds = (evals_s + n_stages * (evals_s + steps * batch_size * per_step)) * n_runs
    return RunEstimate(
        seconds,
        f"from {len(df)} stored stages of {model} ({note}): {evals_s:.0f} s per checkpoint's "
        f"probe + evals, {per_step * 1000:.1f} ms per training example-step",
    )
