"""Every query and every bit of data shaping behind the dashboard pages.

Pure functions: each takes a :class:`~collapse_core.store.Store` (plus selections) and returns a
``pandas.DataFrame`` (or a small dict / list). Pages call these and hand the frames to
:mod:`collapse_core.figures`; pages hold no SQL and no maths. Nothing here imports torch,
transformers, umap or streamlit, so a notebook can use the same views.

Vocabulary:

- a *stage row* is one (run, stage_index) of the ``stages`` table: a checkpoint as produced by a
  pipeline run (the same weights can appear in several runs, e.g. the shared base checkpoint);
- a *standalone checkpoint* is a probed checkpoint that belongs to no run;
- a *selection* is a DataFrame with at least ``key`` (unique per row), ``label`` and
  ``checkpoint_id`` columns (see :func:`checkpoint_choices`); views that plot checkpoints take
  one so that the same weights in two runs stay two lines.
- probe results: when one checkpoint was probed several times on a probe set (different probe
  configs), the most recent probe is used (:func:`latest_probes`).

Middle layer convention (same as :mod:`collapse_core.analysis`): with layers 0..L (0 = token
embedding), the middle layer is ``(L + 1) // 2`` and the last layer is ``L``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

from . import hypothesis, uncertainty
from .analysis import (  # noqa: F401  (ARM_NOTE, ARM_READING: the Hypothesis page's captions)
    ARM_NOTE,
    ARM_QUANTITIES,
    ARM_READING,
    arm_comparison_frame,
    compare_arms,
    with_stage_behaviour,
)
from .catalog import (  # noqa: F401  (part of the views API the pages use)
    _as_list,
    _marks,
    checkpoint_choices,
    evals_wide,
    latest_probes,
    probe_sets,
    probe_settings_choices,
    runs,
    stage_catalog,
    standalone_checkpoints,
)
from .eval_intervals import format_estimate
from .jobs.queue import job_for_key, jobs_table  # noqa: F401
from .segments import progress_table as ray_progress  # noqa: F401  (Runs page, Ray section)
from .store import Store

#: The hypothesis test's metric, outcome and layer-position lists (one place:
#: :mod:`collapse_core.hypothesis`).
COLLAPSE_METRICS = hypothesis.COLLAPSE_METRICS
OUTCOMES = hypothesis.OUTCOMES
OUTCOME_SHORT = hypothesis.OUTCOME_SHORT
LAYER_POSITIONS = hypothesis.LAYER_POSITIONS

#: Human-readable names for layer_metrics.metric (anything else is shown as stored).
METRIC_LABELS: dict[str, str] = {
    "effective_rank": "effective rank",
    "stable_rank": "stable rank",
    "participation_ratio": "participation ratio",
    "alpha_req": "α-ReQ (spectral decay)",
    "alpha_req_r2": "α-ReQ fit R²",
    "anisotropy_cosine": "anisotropy (mean pairwise cosine)",
    "top_pc_share": "top-PC variance share",
    "twonn_dimension": "TwoNN intrinsic dimension",
    "within_prompt_cosine": "within-prompt cosine",
    "between_prompt_cosine": "between-prompt cosine",
    "homogeneity_gap": "homogeneity gap (within − between)",
    "dormant_fraction": "dormant MLP-unit fraction",
    "logit_lens_entropy": "logit-lens entropy",
    "next_token_entropy": "next-token entropy",
    "top1_margin": "top-1 margin",
    "mean_norm": "mean hidden-state norm",
    "effective_rank_robust": "effective rank, top-3 variance dims removed",
    "stable_rank_robust": "stable rank, top-3 variance dims removed",
    "participation_ratio_robust": "participation ratio, top-3 variance dims removed",
    "top_pc_share_robust": "top-PC share, top-3 variance dims removed",
    "anisotropy_centred": "anisotropy, centred (mean direction removed)",
    "cka_drift": "CKA drift from the run's start (1 − linear CKA)",
}


def metric_variant(metric: str) -> str:
    """One sentence saying which variant of a metric a user is looking at (raw or robust to
    massive activations; see :mod:`collapse_core.metrics.robust`)."""
    from .metrics.robust import ROBUST_METRICS, ROGUE_K

    if metric == "anisotropy_centred":
        return ("Centred variant: cosine after subtracting the mean hidden state, so the shared "
                "mean direction (and the massive coordinates it carries) does not count.")  # fmt: skip
    if metric in ROBUST_METRICS:
        return (f"Robust variant: computed with the {ROGUE_K} largest-variance coordinates "
                "removed (massive activations; Timkey & van Schijndel 2021).")  # fmt: skip
    if metric in ROBUST_METRICS.values():
        return ("Raw variant: all coordinates; a few massive-activation coordinates can dominate "
                f"it — compare with '{metric_label(_robust_of(metric))}'.")  # fmt: skip
    return ""


def _robust_of(metric: str) -> str:
    from .metrics.robust import ROBUST_METRICS

    return next((r for r, raw in ROBUST_METRICS.items() if raw == metric), metric)


#: The pinned definitions (README "Metric conventions"), shown next to a picked metric. σ are
#: singular values of the centred hidden states H of a layer, λ eigenvalues of its covariance.
METRIC_DEFINITIONS: dict[str, str] = {
    "effective_rank": "exp(−Σ p log p), p = σ/Σσ (Roy & Vetterli 2007; RankMe ε = 1e-7)",
    "stable_rank": "Σσ² / σ_max²",
    "participation_ratio": "(Σλ)² / Σλ²",
    "alpha_req": "slope α of log λ_i vs log i (Agrawal et al. 2022)",
    "alpha_req_r2": "R² of the α-ReQ fit of log λ_i vs log i",
    "anisotropy_cosine": "mean pairwise cosine of uncentred token vectors, i ≠ j (Ethayarajh 2019)",
    "top_pc_share": "λ_max / Σλ",
    "twonn_dimension": "TwoNN intrinsic dimension on the token subsample (Facco et al. 2017)",
    "within_prompt_cosine": "mean cosine of token pairs in the same prompt",
    "between_prompt_cosine": "mean cosine of token pairs in different prompts",
    "homogeneity_gap": "within-prompt minus between-prompt mean cosine",
    "dormant_fraction": "share of MLP units with E|h_i| / mean_k E|h_k| ≤ τ = 0.1 (Sokar et al. 2023)",
    "logit_lens_entropy": "entropy of softmax(W_U · norm(h)) on the token subsample",
    "next_token_entropy": "entropy of the model's next-token distribution (last layer, "
    "mean over the token subsample)",
    "top1_margin": "p₁ − p₂ of the model's next-token distribution (last layer, mean over the "
    "token subsample)",
    "mean_norm": "mean ‖h‖",
}


def metric_definition(metric: str) -> str:
    """``"<label>: <pinned definition>"`` for a caption or tooltip ('' when unknown)."""
    text = METRIC_DEFINITIONS.get(metric)
    return f"{metric_label(metric)}: {text}" if text else ""


#: Per stage, the eval metric that measures the stage's own behaviour (besides held-out loss).
STAGE_BEHAVIOUR: dict[str, tuple[str, str, str]] = {
    "dpo": ("dpo", "preference_accuracy", "preference acc"),
    "safety": ("safety", "refusal_rate", "refusal rate"),
    "math": ("math", "answer_accuracy", "answer acc"),
    "code": ("code", "pass_at_1", "pass@1"),
    "long_cot": ("long_cot", "answer_accuracy", "answer acc"),
}


def metric_label(metric: str) -> str:
    """Display name of a layer metric (``metric`` itself when unknown)."""
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


# -- database state ------------------------------------------------------------------------
def db_counts(store: Store) -> dict[str, int]:
    """Row counts of the main tables (studies, runs, stages, checkpoints, probes, evals, ...)."""
    tables = ("studies", "runs", "stages", "checkpoints", "probes", "evals", "lora_metrics",
              "calibration_bins", "generations", "correlations", "embeddings")  # fmt: skip
    sql = " UNION ALL ".join(f"SELECT '{t}' AS t, count(*) AS n FROM {t}" for t in tables)
    df = store.query(sql)
    return {str(r.t): int(r.n) for r in df.itertuples()}


def is_empty(store: Store) -> bool:
    """True when the database holds no probe result at all."""
    return store.query("SELECT count(*) AS n FROM probes")["n"].iloc[0] == 0


def first_run_state(store: Store, model: str = "smollm2") -> dict[str, Any]:
    """What the Overview needs on an empty database.

    Returns ``{"empty": bool, "job": dict | None}`` where ``job`` is the newest probe job of
    ``model`` (any status), so the first-run probe is submitted only once.
    """
    empty = is_empty(store)
    probes = jobs_table(store, kind="probe")
    mine = probes[probes["model"] == model]
    job = None if mine.empty else mine.iloc[0].to_dict()
    return {"empty": empty, "job": job}


# -- studies, runs, checkpoints ------------------------------------------------------------
def studies(store: Store) -> pd.DataFrame:
    """Studies with run counts, newest first, and a ``label`` that tells studies of the same
    name apart: name · model · created · arms (:func:`study_label`)."""
    df = store.query(
        "SELECT s.study_id, s.name, s.created_at, s.config_json, count(r.run_id) AS n_runs, "
        "count(*) FILTER (WHERE r.status = 'done') AS n_done, "
        "string_agg(DISTINCT r.arm, ',' ORDER BY r.arm) AS arms "
        "FROM studies s LEFT JOIN runs r USING (study_id) "
        "GROUP BY s.study_id, s.name, s.created_at, s.config_json ORDER BY s.created_at DESC"
    )
    df["label"] = [study_label(r.name, r.config_json, r.created_at, r.arms)
                   for r in df.itertuples(index=False)]  # fmt: skip
    return df.drop(columns="config_json")


def study_label(name: Any, config_json: Any, created_at: Any, arms: Any) -> str:
    """``"quick · tiny-random · 2026-12-01 22:46 · baseline, replay"``."""
    try:
        raw = json.loads(config_json or "{}")
        model = raw.get("run", {}).get("model") or (raw.get("track") or {}).get("base")
        # a tracked series without --base: its checkpoints are the model
        model = str(model) if model else ("tracked series" if "track" in raw else "model unknown")
    except (json.JSONDecodeError, AttributeError, TypeError):
        model = "model unknown"
    model = model.rstrip("/").rsplit("/", 1)[-1]
    when = pd.Timestamp(created_at).strftime("%Y-%m-%d %H:%M") if pd.notna(created_at) else "?"
    arm_text = ", ".join(str(arms).split(",")) if isinstance(arms, str) and arms else "no runs"
    return f"{name} · {model} · {when} · {arm_text}"


def metric_names(store: Store) -> list[str]:
    """Metrics present in ``layer_metrics``, the headline ones first."""
    found = set(store.query("SELECT DISTINCT metric FROM layer_metrics")["metric"].astype(str))
    known = [m for m in METRIC_LABELS if m in found]
    return known + sorted(found - set(known))


def mid_layer(n_layers: int) -> int:
    """The middle layer index for layers 0..n_layers-1 (see module docstring)."""
    return max(n_layers, 1) // 2


# -- layer metrics -------------------------------------------------------------------------
def layer_values(
    store: Store,
    metric: str | Sequence[str],
    probe_set: str,
    checkpoint_ids: Sequence[str],
    prefer_config: str | None = None,
) -> pd.DataFrame:
    """Long rows (checkpoint_id, layer, metric, value, lo, hi, probe_key) from each checkpoint's newest
    probe (under ``prefer_config`` where there is one); lo/hi = the stored 95 % CI from resampling prompts (NaN where not computed)."""
    keys = latest_probes(store, checkpoint_ids, probe_set, prefer_config)
    metrics = [metric] if isinstance(metric, str) else list(metric)
    if keys.empty or not metrics:
        return pd.DataFrame(
            columns=["checkpoint_id", "layer", "metric", "value", "lo", "hi", "probe_key"]
        )
    pk = list(keys["probe_key"])
    # lo/hi: the stored prompt-bootstrap 95 % CI (collapse_core.uncertainty), NaN when none.
    return store.query(
        f"SELECT m.checkpoint_id, m.layer, m.metric, m.value, c.lo, c.hi, m.probe_key "
        f"FROM layer_metrics m "
        f"LEFT JOIN layer_metric_ci c USING (probe_key, layer, metric) "
        f"WHERE m.probe_key IN ({_marks(pk)}) AND m.metric IN ({_marks(metrics)}) "
        f"ORDER BY m.checkpoint_id, m.metric, m.layer",
        pk + metrics,
    )


def layer_curves(
    store: Store, metric: str, probe_set: str, selection: pd.DataFrame
) -> pd.DataFrame:
    """One curve per selected checkpoint: key, label, checkpoint_id, layer, value, lo, hi (the
    95 % CI from resampling prompts, NaN where not stored), by layer."""
    cols = ["key", "label", "checkpoint_id", "layer", "value", "lo", "hi"]
    if selection.empty:
        return pd.DataFrame(columns=cols)
    vals = layer_values(store, metric, probe_set, list(selection["checkpoint_id"].unique()))
    df = selection[["key", "label", "checkpoint_id"]].merge(vals, on="checkpoint_id")
    order = {k: i for i, k in enumerate(selection["key"])}
    df["_o"] = df["key"].map(order)
    return df.sort_values(["_o", "layer"])[cols].reset_index(drop=True)


def metric_heatmap(
    store: Store, metric: str, probe_set: str, selection: pd.DataFrame
) -> pd.DataFrame:
    """Layer × checkpoint matrix of ``metric``: index = layer (ascending), columns = labels in
    selection order; NaN where a checkpoint has no value at that layer."""
    curves = layer_curves(store, metric, probe_set, selection)
    if curves.empty:
        return pd.DataFrame()
    wide = curves.pivot(index="layer", columns="label", values="value")
    labels = [lab for lab in selection["label"] if lab in wide.columns]
    return wide[labels].sort_index()


def layer_groups(layers: Sequence[int], n_groups: int) -> dict[int, str]:
    """Split sorted layers into ``n_groups`` contiguous groups; map layer → "L a–b" label."""
    layers = sorted(int(x) for x in layers)
    if not layers:
        return {}
    n_groups = max(1, min(n_groups, len(layers)))
    out: dict[int, str] = {}
    for chunk in np.array_split(np.array(layers), n_groups):
        lo, hi = int(chunk[0]), int(chunk[-1])
        name = f"L{lo}" if lo == hi else f"L{lo}–{hi}"
        for layer in chunk:
            out[int(layer)] = name
    return out


def stage_curves(
    store: Store,
    metric: str,
    probe_set: str,
    run_ids: Sequence[str],
    layers: Sequence[int] | None = None,
    n_groups: int | None = None,
) -> pd.DataFrame:
    """A metric across the stages of each run, one line per layer or layer group.

    ``layers`` restricts to those layers (one line each); else with ``n_groups`` the layers are
    averaged within contiguous groups; else every layer is a line. Columns: run_id, run_label,
    arm, stage_index, stage, stage_label, line, line_order, value; sorted by run, line,
    stage_index.
    """
    cols = ["run_id", "run_label", "arm", "stage_index", "stage", "stage_label", "line",
            "line_order", "value", "lo", "hi", "exceeds_noise", "noise_test"]  # fmt: skip
    cat = stage_catalog(store, run_ids)
    if cat.empty:
        return pd.DataFrame(columns=cols)
    vals = layer_values(store, metric, probe_set, list(cat["checkpoint_id"].unique()))
    df = cat[["run_id", "run_label", "arm", "stage_index", "stage", "stage_label",
              "checkpoint_id"]].merge(vals, on="checkpoint_id")  # fmt: skip
    if df.empty:
        return pd.DataFrame(columns=cols)
    if layers:
        df = df[df["layer"].isin([int(x) for x in layers])].copy()
        df["line"] = "L" + df["layer"].astype(str)
        df["line_order"] = df["layer"]
    elif n_groups:
        groups = layer_groups(sorted(df["layer"].unique()), n_groups)
        df["line"] = df["layer"].map(groups)
        first = {g: min(k for k, v in groups.items() if v == g) for g in set(groups.values())}
        df["line_order"] = df["line"].map(first)
        df = (
            df.groupby(["run_id", "run_label", "arm", "stage_index", "stage", "stage_label",
                        "line", "line_order"], as_index=False, dropna=False)["value"].mean()
        )  # fmt: skip
        df["lo"] = df["hi"] = np.nan  # a layer-group mean has no stored CI
    else:
        df["line"] = "L" + df["layer"].astype(str)
        df["line_order"] = df["layer"]
    # Layer-group means have no replicates to pair; single-layer lines do.
    paired = None if n_groups and not layers else _paired_changes(store, df, metric)
    order = {r: i for i, r in enumerate(cat["run_id"].unique())}
    df["_o"] = df["run_id"].map(order)
    df = df.sort_values(["_o", "line_order", "stage_index"])
    return flag_stage_changes(df, paired)[cols].reset_index(drop=True)


def _paired_changes(store: Store, df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Paired CIs (:func:`collapse_core.uncertainty.stage_change_cis`, every layer) of each run's
    consecutive-stage changes in ``df`` (one row per run, stage, layer)."""
    probes = df.drop_duplicates(["run_id", "stage_index"]).sort_values("stage_index")
    pairs = []
    for _, grp in probes.groupby("run_id", sort=False):
        keys = list(grp["probe_key"])
        pairs += list(zip(keys, keys[1:], strict=False))
    return uncertainty.stage_change_cis(store, pairs, [metric])


#: The metrics the CLI's stage-change table reads (``analyze``), at the mid and last layer.
STAGE_CHANGE_METRICS = ("effective_rank", "anisotropy_cosine")


def stage_changes(
    store: Store, study_id: str, probe_set: str = "general",
    metrics: Sequence[str] = STAGE_CHANGE_METRICS,
) -> pd.DataFrame:  # fmt: skip
    """Per run and stage, each metric at the mid and last layer as display text
    ``value [lo, hi]`` (95 % prompt-resampling CI) and, from stage 1 on, ``Δ change`` with ``*``
    when it is beyond prompt noise (:func:`flag_stage_changes`: the paired CI of the change,
    else both CIs combined) — the numbers behind the Stages page's filled markers. Columns:
    run, stage, then one per metric and layer. Empty without probed stages."""
    run_ids = list(runs(store, study_id)["run_id"])
    cat = stage_catalog(store, run_ids)
    if cat.empty:
        return pd.DataFrame()
    n_layers = n_layers_of(store, probe_set, list(cat["checkpoint_id"].unique()))
    if not n_layers:
        return pd.DataFrame()
    layers = sorted({mid_layer(n_layers), n_layers - 1})
    out: pd.DataFrame | None = None
    for metric in metrics:
        curves = stage_curves(store, metric, probe_set, run_ids, layers=layers)
        if curves.empty:
            continue
        curves = curves.assign(delta=curves.groupby(["run_id", "line"], sort=False)["value"].diff())
        for line, grp in curves.groupby("line", sort=False):
            column = f"{metric} {line}"
            cells = grp[["run_label", "stage_label"]].assign(**{column: [
                _stage_cell(r.value, r.lo, r.hi, r.delta, r.exceeds_noise)
                for r in grp.itertuples()]})  # fmt: skip
            out = cells if out is None else out.merge(cells, on=["run_label", "stage_label"],
                                                      how="outer", sort=False)  # fmt: skip
    if out is None:
        return pd.DataFrame()
    return out.rename(columns={"run_label": "run", "stage_label": "stage"}).fillna("-")


def _stage_cell(value: float, lo: float, hi: float, delta: float, beyond: bool) -> str:
    text = f"{value:.3f}" if np.isfinite(value) else "-"
    if np.isfinite(lo) and np.isfinite(hi):
        text += f" [{lo:.3f}, {hi:.3f}]"
    if np.isfinite(delta):
        text += f"  Δ {delta:+.3f}{'*' if beyond else ''}"
    return text


STAGE_CHANGE_NOTE = (
    "value [95 % CI from resampling prompts]  Δ = change from the previous stage; * = beyond "
    "prompt noise (the paired CI of the change excludes 0, or both stages' CIs combined where "
    "no paired replicates are stored); any other Δ is within noise, or untested without CIs"
)


def noise_note(curves: pd.DataFrame) -> str:
    """What the error bars / filled markers of :func:`stage_curves` mean, or why there are none."""
    if curves.empty:
        return ""
    if "lo" not in curves or curves["lo"].isna().all():
        return ("No prompt-resampling CIs stored for these lines (layer-group means have none; "
                "`python -m collapse_core analyze` stores them per layer).")  # fmt: skip
    n = int(curves["exceeds_noise"].sum()) if "exceeds_noise" in curves else 0
    tests = set(curves.get("noise_test", pd.Series(dtype=str)).dropna()) - {""}
    how = ("the paired prompt-resampling CI of the change (both stages' probes resampled on "
           "the same prompts) excludes 0" if tests == {"paired"} else
           "the change exceeds the prompt-resampling noise (paired CI of the change where "
           "stored, else both stages' CIs combined)")  # fmt: skip
    return (f"Bars: 95 % CI from resampling prompts. Filled markers ({n}): {how}; hollow ones: "
            "within noise.")  # fmt: skip


def flag_stage_changes(curves: pd.DataFrame, paired: pd.DataFrame | None = None) -> pd.DataFrame:
    """Add ``exceeds_noise`` and ``noise_test``: whether a line's change from its previous stage
    is beyond prompt-sampling noise. With a paired CI of that change (``paired``: rows of
    :func:`collapse_core.uncertainty.stage_change_cis` keyed by the two probes and the layer):
    the CI excludes 0 (``noise_test`` = "paired"). Otherwise the two stages' own CIs combined
    (:func:`collapse_core.uncertainty.exceeds_noise`, "independent"), which ignores that both
    stages saw the same prompts and so is conservative. False at a line's first stage and
    where no CI exists. Rows must be sorted by stage."""
    flags = np.zeros(len(curves), dtype=bool)
    tests = np.full(len(curves), "", dtype=object)
    pos = {idx: i for i, idx in enumerate(curves.index)}
    lookup = {}
    if paired is not None and not paired.empty:
        lookup = {(r.probe_key_a, r.probe_key_b, r.layer): (r.lo, r.hi)
                  for r in paired.itertuples()}  # fmt: skip
    has_keys = "probe_key" in curves and "layer" in curves
    for _, grp in curves.groupby(["run_id", "line"], sort=False):
        rows = list(grp.itertuples())
        for prev, cur in zip(rows, rows[1:], strict=False):
            ci = lookup.get((prev.probe_key, cur.probe_key, cur.layer)) if has_keys else None
            if ci is not None and np.isfinite(ci).all():
                flags[pos[cur.Index]] = bool(ci[0] > 0 or ci[1] < 0)
                tests[pos[cur.Index]] = "paired"
            elif np.isfinite([prev.lo, prev.hi, cur.lo, cur.hi]).all():
                flags[pos[cur.Index]] = uncertainty.exceeds_noise(
                    prev.value, prev.lo, prev.hi, cur.value, cur.lo, cur.hi
                )
                tests[pos[cur.Index]] = "independent"
    return curves.assign(exceeds_noise=flags, noise_test=tests)


def depth_curves(store: Store, metric: str, probe_set: str, run_ids: Sequence[str]) -> pd.DataFrame:
    """A metric across layers, one line per (run, stage): run_id, run_label, arm, stage_index,
    stage_label, label, layer, value, lo, hi (95 % CI, NaN where none); sorted by run,
    stage_index, layer."""
    cat = stage_catalog(store, run_ids)
    cols = ["run_id", "run_label", "arm", "stage_index", "stage_label", "label", "layer", "value",
            "lo", "hi"]  # fmt: skip
    if cat.empty:
        return pd.DataFrame(columns=cols)
    vals = layer_values(store, metric, probe_set, list(cat["checkpoint_id"].unique()))
    df = cat.merge(vals, on="checkpoint_id")
    order = {r: i for i, r in enumerate(cat["run_id"].unique())}
    df["_o"] = df["run_id"].map(order)
    return df.sort_values(["_o", "stage_index", "layer"])[cols].reset_index(drop=True)


def n_layers_of(store: Store, probe_set: str, checkpoint_ids: Sequence[str]) -> int:
    """Largest number of stored layers among the checkpoints' probes (0 when none)."""
    keys = latest_probes(store, checkpoint_ids, probe_set)
    return 0 if keys.empty else int(keys["n_layers"].max())


# -- spectra -------------------------------------------------------------------------------
def spectra(store: Store, probe_set: str, layer: int, selection: pd.DataFrame) -> pd.DataFrame:
    """Covariance eigenvalues (descending, idx 1-based) at ``layer`` per selected checkpoint:
    key, label, checkpoint_id, idx, eigenvalue."""
    cols = ["key", "label", "checkpoint_id", "idx", "eigenvalue"]
    if selection.empty:
        return pd.DataFrame(columns=cols)
    keys = latest_probes(store, list(selection["checkpoint_id"].unique()), probe_set)
    if keys.empty:
        return pd.DataFrame(columns=cols)
    pk = list(keys["probe_key"])
    df = store.query(
        f"SELECT checkpoint_id, idx, eigenvalue FROM spectra WHERE probe_key IN ({_marks(pk)}) "
        f"AND layer = ? ORDER BY checkpoint_id, idx",
        pk + [int(layer)],
    )
    df = selection[["key", "label", "checkpoint_id"]].merge(df, on="checkpoint_id")
    order = {k: i for i, k in enumerate(selection["key"])}
    df["_o"] = df["key"].map(order)
    return df.sort_values(["_o", "idx"])[cols].reset_index(drop=True)


def alpha_fit(eigenvalues: np.ndarray) -> dict[str, float]:
    """α-ReQ fit of one descending spectrum over the documented range (see
    :func:`collapse_core.metrics.alpha_req_from_eigenvalues`): alpha, r2, start, stop and the
    intercept c of log λ_i = c − α log i (least squares over the same indices)."""
    from .metrics import spectral

    lam = np.asarray(eigenvalues, dtype=np.float64)
    alpha, r2 = spectral.alpha_req_from_eigenvalues(lam)
    out = {"alpha": alpha, "r2": r2, "start": np.nan, "stop": np.nan, "intercept": np.nan}
    if lam.size == 0 or not np.isfinite(alpha) or lam[0] <= 0:
        return out
    floor = getattr(spectral, "ALPHA_REQ_REL_FLOOR", 1e-12)
    r = int(np.sum(lam > floor * lam[0]))
    stop = min(r, max(2, lam.size // 2))
    idx = np.arange(1, stop + 1, dtype=np.float64)
    intercept = float(np.mean(np.log(lam[:stop]) + alpha * np.log(idx)))
    out.update(start=1.0, stop=float(stop), intercept=intercept)
    return out


def alpha_fits(spec: pd.DataFrame, stored: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per curve of :func:`spectra`: key, label, alpha, r2, start, stop, intercept, plus the
    stored ``alpha_req`` / ``alpha_req_r2`` when ``stored`` (key, metric, value) is given."""
    rows = []
    for (key, label), grp in spec.groupby(["key", "label"], sort=False):
        fit = alpha_fit(grp.sort_values("idx")["eigenvalue"].to_numpy())
        rows.append({"key": key, "label": label, **fit})
    df = pd.DataFrame(rows, columns=["key", "label", "alpha", "r2", "start", "stop", "intercept"])
    if stored is not None and not stored.empty and not df.empty:
        wide = stored.pivot_table(index="key", columns="metric", values="value", aggfunc="first")
        df["alpha_stored"] = df["key"].map(wide.get("alpha_req", pd.Series(dtype=float)))
        df["r2_stored"] = df["key"].map(wide.get("alpha_req_r2", pd.Series(dtype=float)))
    return df


def alpha_fit_lines(fits: pd.DataFrame) -> pd.DataFrame:
    """Two end points per fit (key, label, idx, eigenvalue) of the fitted power law."""
    rows = []
    for f in fits.itertuples():
        if not (np.isfinite(f.alpha) and np.isfinite(f.stop)):
            continue
        for i in (f.start, f.stop):
            rows.append({"key": f.key, "label": f.label, "idx": float(i),
                         "eigenvalue": float(np.exp(f.intercept - f.alpha * np.log(i)))})  # fmt: skip
    return pd.DataFrame(rows, columns=["key", "label", "idx", "eigenvalue"])


def spectrum_panel(
    store: Store, probe_set: str, layer: int, selection: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """(spectra, fits with stored α, fit line points) for the spectra page at one layer."""
    spec = spectra(store, probe_set, layer, selection)
    stored = layer_values(
        store, ["alpha_req", "alpha_req_r2"], probe_set, list(selection["checkpoint_id"].unique())
    )
    stored = stored[stored["layer"] == int(layer)]
    stored = selection[["key", "checkpoint_id"]].merge(stored, on="checkpoint_id")
    fits = alpha_fits(spec, stored)
    return spec, fits, alpha_fit_lines(fits)


# -- evals and the headline table ----------------------------------------------------------
def _stage_behaviour(row: pd.Series) -> tuple[float, str]:
    stage = str(row.get("stage", ""))
    loss = row.get(f"{stage}_heldout_loss", np.nan)
    text = []
    if stage in STAGE_BEHAVIOUR:
        ev, metric, name = STAGE_BEHAVIOUR[stage]
        value = row.get(f"{ev}_{metric}", np.nan)
        if pd.notna(value):
            text.append(f"{name} {value:.2f}")
        if stage == "safety" and pd.notna(row.get("safety_over_refusal_rate", np.nan)):
            text.append(f"over-refusal {row['safety_over_refusal_rate']:.2f}")
    if pd.notna(loss):
        text.insert(0, f"own loss {loss:.3f}")
    return (float(loss) if pd.notna(loss) else np.nan), " · ".join(text)


def _spark(values: Iterable[float]) -> list[float | None]:
    """A sparkline list: floats, with NaN (e.g. a metric undefined at one layer) as None."""
    return [float(v) if np.isfinite(v) else None for v in values]


def _sparkline_frame(
    store: Store, probe_set: str, checkpoint_ids: Sequence[str], prefer_config: str | None = None
) -> pd.DataFrame:
    """Per checkpoint: n_layers, erank_mid, erank_last, anisotropy (layer mean), plus per-layer
    lists erank_layers / aniso_layers for sparklines."""
    vals = layer_values(store, ["effective_rank", "anisotropy_cosine"], probe_set, checkpoint_ids,
                        prefer_config)  # fmt: skip
    rows = []
    for ckpt, grp in vals.groupby("checkpoint_id"):
        er = grp[grp["metric"] == "effective_rank"].sort_values("layer")
        an = grp[grp["metric"] == "anisotropy_cosine"].sort_values("layer")
        n = int(grp["layer"].max()) + 1
        mid = er[er["layer"] == mid_layer(n)]["value"]
        rows.append({
            "checkpoint_id": ckpt, "n_layers": n,
            "erank_mid": float(mid.iloc[0]) if len(mid) else np.nan,
            "erank_last": float(er["value"].iloc[-1]) if len(er) else np.nan,
            "anisotropy": float(an["value"].mean()) if len(an) else np.nan,
            "erank_layers": _spark(er["value"]),
            "aniso_layers": _spark(an["value"]),
        })  # fmt: skip
    return pd.DataFrame(
        rows,
        columns=[
            "checkpoint_id",
            "n_layers",
            "erank_mid",
            "erank_last",
            "anisotropy",
            "erank_layers",
            "aniso_layers",
        ],  # fmt: skip
    )


HEADLINE_COLUMNS = [
    "run_label", "stage_label", "erank_mid", "erank_last", "erank_layers", "anisotropy",
    "aniso_layers", "plasticity", "ood_accuracy", "ood_ece", "stage_behaviour", "behaviour",
    "checkpoint_id",
]  # fmt: skip
#: :func:`standalone_table` shown as two tables that each fit the page (after its label).
STANDALONE_GROUPS: dict[str, list[str]] = {
    "Model and probe": ["architecture", "n_layers", "d_model", "n_params", "probe_sets",
                        "settings", "checkpoint_id"],
    "Representations": ["erank_mid", "erank_last", "erank_layers", "anisotropy", "aniso_layers"],
}  # fmt: skip
#: Headline scores stored with a 95 % interval over their items (shown as ``v [lo, hi]``).
HEADLINE_INTERVALS = ("ood_accuracy", "ood_ece")
_HEADLINE_BOUNDS = [f"{c}{end}" for c in HEADLINE_INTERVALS for end in ("_lo", "_hi")]
#: The headline split in two tables that each fit the page's width (13 columns, two of them
#: sparklines, do not): the geometry, then the outcomes; both lead with run and stage.
HEADLINE_GROUPS: dict[str, list[str]] = {
    "Representations": ["erank_mid", "erank_last", "erank_layers", "anisotropy", "aniso_layers"],
    "Outcomes": ["plasticity", "ood_accuracy", "ood_ece", "stage_behaviour", "behaviour",
                 "checkpoint_id"],
}  # fmt: skip


def headline_table(
    store: Store,
    probe_set: str,
    run_ids: Sequence[str] | None = None,
    study_id: str | None = None,
) -> pd.DataFrame:
    """The Overview's per-checkpoint table, one row per stage row of the runs/study.

    Columns (:data:`HEADLINE_COLUMNS` plus run_id, stage_index, key, and ``<score>_lo`` /
    ``_hi`` of every :data:`HEADLINE_INTERVALS` score): effective rank at the middle and last
    layer, anisotropy (mean pairwise cosine averaged over layers) with per-layer sparkline
    lists, plasticity (``plasticity_auc_rel`` or, for runs without a stage-0 value, the raw
    AUC), OOD accuracy and ECE with their stored 95 % intervals (NaN where none), the stage's
    own held-out loss and a behaviour summary (refusal rate, answer accuracy, ... from
    ``evals``). :func:`headline_display` is the table as shown (scores as ``v [lo, hi]``).
    """
    cat = stage_catalog(store, run_ids, study_id)
    if cat.empty:
        return pd.DataFrame(
            columns=[*HEADLINE_COLUMNS, "run_id", "stage_index", "key", *_HEADLINE_BOUNDS]
        )
    spark = _sparkline_frame(store, probe_set, list(cat["checkpoint_id"].unique()))
    df = cat.merge(spark, on="checkpoint_id", how="left")
    ev = evals_wide(store, list(cat["run_id"].unique()), intervals=True)
    df = df.merge(ev, on=["run_id", "stage_index"], how="left")
    rel = df.get("plasticity_auc_rel", pd.Series(np.nan, index=df.index))
    raw = df.get("plasticity_auc", pd.Series(np.nan, index=df.index))
    df["plasticity"] = rel.where(rel.notna(), raw)
    for col in (*HEADLINE_INTERVALS, *_HEADLINE_BOUNDS):
        if col not in df:
            df[col] = np.nan
    beh = [_stage_behaviour(r) for _, r in df.iterrows()]
    df["stage_behaviour"] = [b[0] for b in beh]
    df["behaviour"] = [b[1] for b in beh]
    for col in ("erank_layers", "aniso_layers"):
        df[col] = [v if isinstance(v, list) else [] for v in df[col]]
    return df[[*HEADLINE_COLUMNS, "run_id", "stage_index", "key", *_HEADLINE_BOUNDS]]


def headline_display(head: pd.DataFrame, digits: int = 3) -> pd.DataFrame:
    """:func:`headline_table` as the Overview and the report show it: every
    :data:`HEADLINE_INTERVALS` score as the text ``"v [lo, hi]"`` (:func:`with_intervals`; the
    bare value where no interval is stored)."""
    return with_intervals(head, HEADLINE_INTERVALS, digits)


def standalone_table(
    store: Store, probe_set: str | None = None, prefer_config: str | None = None
) -> pd.DataFrame:
    """Standalone checkpoints with headline metrics of one probe set (default: each
    checkpoint's first of ``general`` or any), sparklines, and the probe ``settings`` the numbers
    come from (:func:`catalog.probe_settings_label`; ``prefer_config`` picks them where stored)."""
    sa = standalone_checkpoints(store)
    cols = ["label", "architecture", "n_layers", "d_model", "n_params", "probe_sets", "erank_mid",
            "erank_last", "erank_layers", "anisotropy", "aniso_layers", "settings",
            "checkpoint_id"]  # fmt: skip
    if sa.empty:
        return pd.DataFrame(columns=cols)
    frames = []
    for pset in probe_sets(store, list(sa["checkpoint_id"])):
        if probe_set is not None and pset != probe_set:
            continue
        frame = _sparkline_frame(store, pset, list(sa["checkpoint_id"]), prefer_config)
        settings = latest_probes(store, list(sa["checkpoint_id"]), pset, prefer_config)
        frame = frame.merge(settings[["checkpoint_id", "settings"]], on="checkpoint_id", how="left")
        frames.append(frame.assign(settings=[f"{pset}: {x}" for x in frame["settings"]]))
    spark = (
        pd.concat(frames).drop_duplicates("checkpoint_id")
        if frames
        else _sparkline_frame(store, "", []).assign(settings=[])
    )
    df = sa.merge(spark.drop(columns="n_layers"), on="checkpoint_id", how="left")
    for col in ("erank_layers", "aniso_layers"):
        df[col] = [v if isinstance(v, list) else [] for v in df[col]]
    return df[cols]


def stage_timeline(store: Store, run_ids: Sequence[str] | None = None,
                   study_id: str | None = None) -> pd.DataFrame:  # fmt: skip
    """Stages as timeline bars: run_label, stage_label, stage, start, finish, seconds, steps.

    ``finish`` is when the stage was committed; ``start`` = finish − its stored seconds
    (training + probe + evaluations; for stage 0 its probe + evaluations), at least one second
    earlier so every stage is visible.
    """
    cat = stage_catalog(store, run_ids, study_id)
    cols = ["run_id", "run_label", "stage_index", "stage", "stage_label", "start", "finish",
            "seconds", "steps"]  # fmt: skip
    if cat.empty:
        return pd.DataFrame(columns=cols)
    df = cat.copy()
    df["finish"] = pd.to_datetime(df["created_at"])
    secs = df["seconds"].fillna(0.0).clip(lower=1.0)
    df["start"] = df["finish"] - pd.to_timedelta(secs, unit="s")
    return df[cols]


# -- calibration and OOD -------------------------------------------------------------------
def calibration_bins(store: Store, selection: pd.DataFrame, eval_name: str = "ood") -> pd.DataFrame:
    """Reliability bins per selected checkpoint: key, label, bin, lower, upper, count,
    mean_confidence, accuracy (empty bins dropped)."""
    cols = ["key", "label", "bin", "lower", "upper", "count", "mean_confidence", "accuracy"]
    ids = list(selection["checkpoint_id"].unique()) if not selection.empty else []
    if not ids:
        return pd.DataFrame(columns=cols)
    df = store.query(
        f"SELECT checkpoint_id, bin, lower, upper, count, mean_confidence, accuracy "
        f"FROM calibration_bins WHERE eval = ? AND checkpoint_id IN ({_marks(ids)}) "
        f"AND count > 0 ORDER BY checkpoint_id, bin",
        [eval_name, *ids],
    )
    df = selection[["key", "label", "checkpoint_id"]].merge(df, on="checkpoint_id")
    order = {k: i for i, k in enumerate(selection["key"])}
    df["_o"] = df["key"].map(order)
    return df.sort_values(["_o", "bin"])[cols].reset_index(drop=True)


def generations(
    store: Store, study_id: str | None = None, eval_name: str = "code_pass_at_1"
) -> pd.DataFrame:
    """Stored generations of one eval for a study's stages, one row per (stage, item): key,
    run_label, stage_label, label, checkpoint_id, item_id, status, prompt, response, program;
    in stage order, then by item id. ``eval_name``: ``code_pass_at_1`` (HumanEval solutions and
    their sandbox status) or ``safety_refusal`` (answers to held-out safety prompts, refused or
    answered)."""
    cols = ["key", "run_label", "stage_label", "label", "checkpoint_id", "item_id", "status",
            "prompt", "response", "program"]  # fmt: skip
    cat = stage_catalog(store, study_id=study_id)
    ids = list(cat["checkpoint_id"].unique()) if not cat.empty else []
    if not ids:
        return pd.DataFrame(columns=cols)
    df = store.query(
        f"SELECT checkpoint_id, item_id, status, prompt, response, program FROM generations "
        f"WHERE eval = ? AND checkpoint_id IN ({_marks(ids)}) ORDER BY item_id",
        [eval_name, *ids],
    )
    df = cat[["key", "run_label", "stage_label", "label", "checkpoint_id"]].merge(
        df, on="checkpoint_id"
    )
    return df[cols].reset_index(drop=True)


def calibration_evals(store: Store) -> list[str]:
    """Eval names that have reliability bins (``ood`` first)."""
    names = list(store.query("SELECT DISTINCT eval FROM calibration_bins")["eval"].astype(str))
    return sorted(names, key=lambda n: (n != "ood", n))


#: The calibration-table scores, in display order (``evals`` metrics of a multiple-choice eval).
CALIBRATION_METRICS = ("accuracy", "ece", "mce", "brier", "nll")


def calibration_summary(
    store: Store, run_ids: Sequence[str], eval_name: str = "ood"
) -> pd.DataFrame:
    """Per stage row: run_label, stage_label, ``n`` (items scored), accuracy, ece, mce, brier,
    nll of ``eval_name`` (from ``evals``) each with its 95 % interval ``<metric>_lo`` /
    ``<metric>_hi`` (NaN where not stored), plus key, run_id, stage_index, checkpoint_id."""
    cat = stage_catalog(store, run_ids)
    bounds = [f"{m}{b}" for m in CALIBRATION_METRICS for b in ("_lo", "_hi")]
    cols = ["run_label", "stage_label", "n", *CALIBRATION_METRICS, *bounds, "key", "run_id",
            "stage_index", "checkpoint_id"]  # fmt: skip
    if cat.empty:
        return pd.DataFrame(columns=cols)
    ev = evals_wide(store, list(cat["run_id"].unique()), intervals=True)
    df = cat.merge(ev, on=["run_id", "stage_index"], how="left")
    for m in CALIBRATION_METRICS:
        for suffix in ("", "_lo", "_hi"):
            src = f"{eval_name}_{m}{suffix}"
            df[f"{m}{suffix}"] = df[src] if src in df else np.nan
    n_src = f"{eval_name}_accuracy_n"
    df["n"] = df[n_src] if n_src in df else np.nan
    return df[cols]


def with_intervals(df: pd.DataFrame, metrics: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """``df`` with each metric column replaced by the text ``"v [lo, hi]"`` from its ``_lo`` /
    ``_hi`` columns (:func:`collapse_core.eval_intervals.format_estimate`; the bare value where
    there is no interval), for tables a reader compares by eye."""
    out = df.copy()
    for m in metrics:
        lo = out.get(f"{m}_lo", pd.Series(np.nan, index=out.index))
        hi = out.get(f"{m}_hi", pd.Series(np.nan, index=out.index))
        out[m] = [format_estimate(v, a, b, digits) for v, a, b in zip(out[m], lo, hi, strict=True)]
    return out


def evals_table(store: Store, run_ids: Sequence[str], digits: int = 3) -> pd.DataFrame:
    """Every eval of the runs' stages, one row per stage (``label`` first), each score as the
    text ``"v [lo, hi]"`` (:func:`with_intervals`, the bare value where none is stored): the
    report's and ``export`` readers' view of :func:`evals_wide`."""
    ev = evals_wide(store, run_ids, intervals=True)
    cat = stage_catalog(store, run_ids)
    if cat.empty or ev.empty:
        return pd.DataFrame(columns=["label"])
    ev = cat[["run_id", "stage_index", "label"]].merge(ev, on=["run_id", "stage_index"])
    scores = [c for c in ev.columns if c not in ("run_id", "stage_index", "label")
              and not c.endswith(("_lo", "_hi", "_n"))]  # fmt: skip
    return with_intervals(ev, scores, digits)[["label", *scores]]


def outcome_across_stages(
    store: Store, run_ids: Sequence[str], outcomes: Sequence[str] = ("ood_accuracy", "ood_ece")
) -> pd.DataFrame:
    """Long rows run_id, run_label, arm, stage_index, stage_label, outcome, value, lo, hi, n
    (the stored 95 % interval and items scored, NaN where absent; ordered by outcome as given,
    run, stage_index) for outcome columns of :func:`evals_wide`."""
    cat = stage_catalog(store, run_ids)
    cols = ["run_id", "run_label", "arm", "stage_index", "stage_label", "outcome", "value",
            "lo", "hi", "n"]  # fmt: skip
    if cat.empty:
        return pd.DataFrame(columns=cols)
    ev = evals_wide(store, list(cat["run_id"].unique()), intervals=True)
    df = cat.merge(ev, on=["run_id", "stage_index"], how="left")
    present = [o for o in outcomes if o in df]
    if not present:
        return pd.DataFrame(columns=cols)
    ids = ["run_id", "run_label", "arm", "stage_index", "stage_label"]
    frames = []
    for name, suffix in (("value", ""), ("lo", "_lo"), ("hi", "_hi"), ("n", "_n")):
        part = df[ids].copy()
        for o in present:
            part[o] = df[f"{o}{suffix}"] if f"{o}{suffix}" in df else np.nan
        frames.append(part.melt(id_vars=ids, value_vars=present, var_name="outcome",
                                value_name=name))  # fmt: skip
    long = frames[0]
    for part in frames[1:]:
        long[part.columns[-1]] = part[part.columns[-1]].to_numpy()
    long = long.dropna(subset=["value"])
    order = {r: i for i, r in enumerate(cat["run_id"].unique())}
    long["_o"] = long["run_id"].map(order)
    long["_k"] = long["outcome"].map({o: i for i, o in enumerate(present)})
    return long.sort_values(["_k", "_o", "stage_index"])[cols].reset_index(drop=True)


# -- LoRA updates --------------------------------------------------------------------------
def short_module(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` → ``L3.q_proj`` (other names unchanged)."""
    parts = str(name).split(".")
    if "layers" in parts:
        i = parts.index("layers")
        if i + 1 < len(parts):
            return f"L{parts[i + 1]}.{parts[-1]}"
    return str(name)


def _module_sort_key(name: str) -> tuple:
    parts = str(name).split(".")
    if "layers" in parts:
        i = parts.index("layers")
        try:
            return (0, int(parts[i + 1]), parts[-1])
        except (ValueError, IndexError):
            pass
    return (1, 0, str(name))


def lora_runs(store: Store, study_id: str | None = None) -> list[str]:
    """Run ids that have LoRA-update metrics (of the study, when given)."""
    sql = "SELECT DISTINCT l.run_id FROM lora_metrics l JOIN runs r USING (run_id)"
    params: list[Any] = []
    if study_id:
        sql += " WHERE r.study_id = ?"
        params.append(study_id)
    return list(store.query(sql + " ORDER BY 1", params)["run_id"])


#: How each ``stages.method`` is named on the pages.
METHOD_LABELS = {"lora": "LoRA", "full": "full fine-tuning", "unknown": "(method not recorded)"}


def stage_methods(store: Store, run_id: str) -> dict[str, str]:
    """``{"<index>:<stage>": method}`` of a run's trained stages in order: ``lora``, ``full`` or
    ``unknown`` (a tracked full checkpoint of a user's own series).

    A stage row with an adapter but no method (a file from before ``[train] method`` existed,
    opened read-only so it was never migrated) was trained with LoRA, the only method then."""
    lora = "CASE WHEN adapter_path IS NOT NULL THEN 'lora' ELSE 'unknown' END"
    method = f"coalesce(method, {lora})" if "method" in store.columns("stages") else lora
    df = store.query(
        f"SELECT stage_index, stage, {method} AS method FROM stages WHERE run_id = ? "
        "AND stage_index > 0 ORDER BY stage_index",
        [run_id],
    )
    return {f"{r.stage_index}:{r.stage}": str(r.method) for r in df.itertuples()}


def lora_metric_names(store: Store, run_id: str, pairwise: bool = False) -> list[str]:
    """Metrics of a run's LoRA updates: per-update ones, or (``pairwise``) between stages."""
    cond = "IS NOT NULL" if pairwise else "IS NULL"
    df = store.query(
        f"SELECT DISTINCT metric FROM lora_metrics WHERE run_id = ? AND other_stage {cond}",
        [run_id],
    )
    names = sorted(df["metric"].astype(str))
    first = ["effective_rank", "subspace_overlap", "intruder_dimensions"]
    return sorted(names, key=lambda n: (n not in first, first.index(n) if n in first else 0, n))


def _stage_order(store: Store, run_id: str, names: Iterable[str]) -> list[str]:
    """Stage names of lora_metrics in chain order (``"1:sft"`` style sorts by index)."""

    def key(name: str) -> tuple:
        head = str(name).split(":")[0]
        return (int(head), str(name)) if head.isdigit() else (10**6, str(name))

    return sorted(set(map(str, names)), key=key)


def lora_update_table(store: Store, run_id: str, metric: str) -> pd.DataFrame:
    """Stage × module matrix of a per-update LoRA metric (rows in chain order, columns by layer
    then module name, shortened with :func:`short_module`)."""
    df = store.query(
        "SELECT stage, module, value FROM lora_metrics WHERE run_id = ? AND metric = ? "
        "AND other_stage IS NULL",
        [run_id, metric],
    )
    if df.empty:
        return pd.DataFrame()
    wide = df.pivot_table(index="stage", columns="module", values="value", aggfunc="mean")
    modules = sorted(wide.columns, key=_module_sort_key)
    wide = wide.loc[_stage_order(store, run_id, wide.index), modules]
    wide.columns = [short_module(m) for m in modules]
    wide.index.name = "stage"
    return wide


def lora_stage_summary(store: Store, run_id: str) -> pd.DataFrame:
    """Per stage: the mean over modules of every per-update metric (stage rows in order)."""
    df = store.query(
        "SELECT stage, metric, avg(value) AS value FROM lora_metrics WHERE run_id = ? "
        "AND other_stage IS NULL GROUP BY stage, metric",
        [run_id],
    )
    if df.empty:
        return pd.DataFrame()
    wide = df.pivot(index="stage", columns="metric", values="value")
    wide = wide.loc[_stage_order(store, run_id, wide.index)]
    wide.columns.name = None
    return wide.reset_index()


def lora_modules(store: Store, run_id: str) -> list[str]:
    """Adapted modules of a run (full names), in layer order."""
    df = store.query("SELECT DISTINCT module FROM lora_metrics WHERE run_id = ?", [run_id])
    return sorted(df["module"].astype(str), key=_module_sort_key)


def lora_pair_matrix(
    store: Store,
    run_id: str,
    metric: str = "subspace_overlap",
    module: str | None = None,
    full: bool = True,
) -> pd.DataFrame:
    """Stage × stage matrix of a pairwise LoRA metric (mean over modules, or one ``module``).

    ``full``: symmetric square matrix with the diagonal set to 1 for ``subspace_overlap`` and 0
    for principal angles. Otherwise only the measured pairs: rows = later stages, columns =
    earlier stages (lower triangle, NaN above it). Pairs without data are NaN."""
    sql = (
        "SELECT stage, other_stage, avg(value) AS value FROM lora_metrics WHERE run_id = ? "
        "AND metric = ? AND other_stage IS NOT NULL"
    )
    params: list[Any] = [run_id, metric]
    if module:
        sql += " AND module = ?"
        params.append(module)
    df = store.query(sql + " GROUP BY stage, other_stage", params)
    if df.empty:
        return pd.DataFrame()
    stages = _stage_order(store, run_id, list(df["stage"]) + list(df["other_stage"]))
    mat = pd.DataFrame(np.nan, index=stages, columns=stages)
    for r in df.itertuples():
        mat.loc[r.stage, r.other_stage] = r.value
        if full:
            mat.loc[r.other_stage, r.stage] = r.value
    if not full:
        return mat.iloc[1:, :-1]
    diag = 1.0 if metric == "subspace_overlap" else (0.0 if "angle" in metric else np.nan)
    for s in stages:
        mat.loc[s, s] = diag
    return mat


# -- hypothesis ----------------------------------------------------------------------------
def checkpoint_outcomes(store: Store, study_id: str, probe_set: str) -> pd.DataFrame:
    """One row per stage row of the study: :func:`collapse_core.hypothesis.checkpoint_table`
    (identifiers, ``<metric>@mid|last|mean``, eval columns, outcomes)."""
    return hypothesis.checkpoint_table(store, study_id, probe_set)


def hypothesis_tests(store: Store, study_id: str, probe_set: str) -> tuple[pd.DataFrame, str]:
    """The study's verdict table (:func:`collapse_core.hypothesis.study_tests`): (rows,
    ``"stored"`` | ``"computed"``), one row per (metric, layer position, outcome)."""
    # Computed on the fly (nothing stored) with fewer resamples than `analyze` (1000 / 2000),
    # so a page stays responsive; the stored table uses the full counts.
    return hypothesis.study_tests(store, study_id, probe_set, n_boot=300, n_perm=500)


def test_row(tests: pd.DataFrame, metric: str, where: str, outcome: str) -> dict[str, Any] | None:
    """The row of :func:`hypothesis_tests` for one (metric, position, outcome), or None."""
    hit = tests[(tests["collapse_metric"] == metric) & (tests["layer"] == where)
                & (tests["outcome"] == outcome)]  # fmt: skip
    return None if hit.empty else hit.iloc[0].to_dict()


def testable(row: dict[str, Any] | pd.Series) -> bool:
    """Whether a verdict row had enough independent runs and within-stage points for the test
    (:data:`collapse_core.hypothesis.MIN_LINEAGES`, ``MIN_WITHIN``); below them its ρ is only
    descriptive (with 2 runs it is ±1 or 0 by construction)."""
    return bool(row["n_lineages"] >= hypothesis.MIN_LINEAGES
                and row["n_within"] >= hypothesis.MIN_WITHIN)  # fmt: skip


def verdict_table(tests: pd.DataFrame, position: str) -> pd.DataFrame:
    """The verdict rows at one layer position for display: metric and outcome by their labels,
    columns named as on the page, ρ_w and its CI blank where the pair is not :func:`testable`."""
    cols = {"metric": "metric", "outcome": "outcome", "verdict": "verdict", "within_rho": "ρ_w",
            "ci_low": "CI low", "ci_high": "CI high", "p_perm": "p (perm.)", "q_value": "q (BH)",
            "fe_beta": "β_FE", "pooled_rho": "pooled ρ", "n_lineages": "independent runs",
            "n_within": "within-stage points", "reason": "reason"}  # fmt: skip
    rows = tests[tests["layer"] == position]
    if rows.empty:
        return pd.DataFrame(columns=list(cols.values()))
    ok = rows.apply(testable, axis=1)
    out = rows.assign(
        metric=rows["collapse_metric"].map(metric_label),
        outcome=rows["outcome"].map(lambda o: OUTCOME_SHORT.get(o, o)),
        within_rho=rows["within_rho"].where(ok), ci_low=rows["ci_low"].where(ok),
        ci_high=rows["ci_high"].where(ok),
    )  # fmt: skip
    return out[list(cols)].rename(columns=cols).reset_index(drop=True)


def intervention_table(store: Store, study_id: str, probe_set: str) -> pd.DataFrame:
    """Runs grouped by intervention arm, at the end of each chain: per arm the number of runs,
    its final stages and the mean of each quantity of
    :data:`collapse_core.analysis.ARM_QUANTITIES` (levels; the differences to the baseline,
    paired and with CIs, are :func:`arm_deltas`). The baseline row comes first."""
    table = checkpoint_outcomes(store, study_id, probe_set)
    if table.empty:
        return pd.DataFrame()
    table = with_stage_behaviour(table)
    last = table.loc[table.groupby("run_id")["stage_index"].idxmax()]
    labels = {col: label for _, col, label in ARM_QUANTITIES if col in last}
    grouped = last.groupby("arm", dropna=False)
    out = grouped[list(labels)].mean()
    out.insert(0, "runs", grouped["run_id"].nunique())
    out.insert(1, "final stage", grouped["stage_label"].agg(lambda s: ", ".join(sorted(set(s)))))
    out = out.rename(columns=labels)
    out.index.name = "arm"
    out = out.reset_index()
    return out.sort_values("arm", key=lambda s: s != "baseline", kind="stable").reset_index(
        drop=True
    )


def arm_deltas(store: Store, study_id: str, probe_set: str, n_boot: int = 1000) -> pd.DataFrame:
    """Δ (arm − baseline) paired by (order, seed), with 95 % CIs over pairs, as display text
    (:func:`collapse_core.analysis.compare_arms` → :func:`~collapse_core.analysis.arm_comparison_frame`:
    the table ``analyze`` prints)."""
    return arm_comparison_frame(compare_arms(store, study_id, n_boot, probe_set))


def pretty_seconds(seconds: float | None) -> str:
    """``75`` → ``"1 min 15 s"``; None/NaN → ``"unknown"``."""
    if seconds is None or not math.isfinite(float(seconds)):
        return "unknown"
    s = int(round(float(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"
