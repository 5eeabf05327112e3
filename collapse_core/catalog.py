"""What is in the store: studies' runs, their committed stages, standalone checkpoints and the
newest probe of each. One checkpoint table for the pipeline, embeddings, analysis, views and
report (so a checkpoint is labelled and ordered the same way everywhere).

Pure queries over a :class:`~collapse_core.store.Store`; no torch, no streamlit.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import pandas as pd

from .store import Store


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def _as_list(values: Iterable[Any] | None) -> list[Any]:
    return [] if values is None else [v for v in values if v is not None]


def _run_labels(df: pd.DataFrame) -> list[str]:
    """Shortest label that tells the runs apart: arm, then seed, then order, then the id."""
    if df.empty:
        return []
    parts: list[pd.Series] = [df["arm"].fillna("run").astype(str)]
    if df["seed"].nunique() > 1:
        parts.append("seed " + df["seed"].astype("Int64").astype(str))
    if df["stage_order"].nunique() > 1:
        parts.append(df["stage_order"].fillna("").astype(str).str.replace(",", "→"))
    labels = parts[0]
    for part in parts[1:]:
        labels = labels + " · " + part
    if df["study_id"].nunique() > 1:
        labels = labels + " (" + df["study_name"].fillna(df["study_id"]).astype(str) + ")"
    out = list(labels)
    seen: dict[str, int] = {}
    for i, label in enumerate(out):
        if out.count(label) > 1:
            seen[label] = seen.get(label, 0) + 1
            out[i] = f"{label} #{seen[label]}"
    return out


def runs(store: Store, study_id: str | None = None) -> pd.DataFrame:
    """Runs (optionally of one study) with stage counts and a short distinguishing ``label``."""
    sql = (
        "SELECT r.run_id, r.study_id, st.name AS study_name, r.name, r.arm, r.seed, "
        "r.stage_order, r.status, r.created_at, r.finished_at, "
        "(SELECT count(*) FROM stages s WHERE s.run_id = r.run_id) AS n_stages "
        "FROM runs r LEFT JOIN studies st USING (study_id)"
    )
    params: list[Any] = []
    if study_id:
        sql += " WHERE r.study_id = ?"
        params.append(study_id)
    df = store.query(sql + " ORDER BY r.created_at, r.run_id", params)
    df["n_planned"] = [len(str(o).split(",")) + 1 if o else None for o in df["stage_order"]]
    df["label"] = _run_labels(df)
    return df


def stage_catalog(
    store: Store, run_ids: Sequence[str] | None = None, study_id: str | None = None
) -> pd.DataFrame:
    """One row per committed stage: run, stage_index, stage, checkpoint and display labels.

    Columns: key (``run_id/stage_index``), run_id, run_label, arm, seed, study_id, stage_index,
    stage, stage_label (``"1:sft"``), label (stage_label, prefixed by run_label when more than
    one run is shown), checkpoint_id, steps, seconds, train_loss_first/last, created_at.
    Ordered by run (in ``run_ids`` order when given, else by creation) then stage_index.
    """
    rdf = runs(store, study_id)
    if run_ids is not None:
        rdf = rdf[rdf["run_id"].isin(list(run_ids))]
    if rdf.empty:
        return pd.DataFrame(
            columns=[
                "key",
                "run_id",
                "run_label",
                "arm",
                "seed",
                "study_id",
                "stage_index",
                "stage",
                "stage_label",
                "label",
                "checkpoint_id",
            ]  # fmt: skip
        )
    ids = list(rdf["run_id"])
    df = store.query(
        f"SELECT run_id, stage_index, stage, checkpoint_id, steps, seconds, train_loss_first, "
        f"train_loss_last, created_at FROM stages WHERE run_id IN ({_marks(ids)}) "
        f"ORDER BY run_id, stage_index",
        ids,
    )
    meta = rdf.set_index("run_id")
    wanted = [r for r in dict.fromkeys(run_ids) if r in set(ids)] if run_ids is not None else ids
    order = {r: i for i, r in enumerate(wanted)}
    df["run_label"] = df["run_id"].map(meta["label"])
    df["arm"] = df["run_id"].map(meta["arm"])
    df["seed"] = df["run_id"].map(meta["seed"])
    df["study_id"] = df["run_id"].map(meta["study_id"])
    df["stage_label"] = df["stage_index"].astype(str) + ":" + df["stage"].astype(str)
    multi = df["run_id"].nunique() > 1
    df["label"] = (df["run_label"] + " · " + df["stage_label"]) if multi else df["stage_label"]
    df["key"] = df["run_id"] + "/" + df["stage_index"].astype(str)
    df["_o"] = df["run_id"].map(order)
    df = df.sort_values(["_o", "stage_index"]).drop(columns="_o").reset_index(drop=True)
    return df


def standalone_checkpoints(store: Store) -> pd.DataFrame:
    """Probed checkpoints first seen outside any pipeline run (uploads, the bundled model), newest
    first, with probe sets; one that a run later started from stays listed here as well."""
    df = store.query(
        "SELECT c.checkpoint_id, c.name, c.source, c.kind, c.architecture, c.n_layers, "
        "c.d_model, c.n_params, c.created_at, "
        "string_agg(DISTINCT p.probe_set, ', ' ORDER BY p.probe_set) AS probe_sets, "
        "max(p.created_at) AS probed_at "
        "FROM checkpoints c JOIN probes p USING (checkpoint_id) "
        "WHERE c.run_id IS NULL GROUP BY ALL ORDER BY probed_at DESC"
    )
    df["label"] = _standalone_labels(df)
    df["key"] = "ckpt/" + df["checkpoint_id"]
    return df


def _standalone_labels(df: pd.DataFrame) -> list[str]:
    names = df["name"].fillna("checkpoint").astype(str)
    dup = names.duplicated(keep=False)
    return [f"{n} ({c[:8]})" if d else n for n, c, d in zip(names, df["checkpoint_id"], dup,
                                                             strict=True)]  # fmt: skip


def checkpoint_choices(
    store: Store,
    run_ids: Sequence[str] | None = None,
    study_id: str | None = None,
    include_standalone: bool = True,
) -> pd.DataFrame:
    """A selection frame: the stage rows of the given runs/study, then standalone checkpoints.

    Columns: key, label, checkpoint_id, run_id (None for standalone), stage_index, stage, group
    ("run label" or "standalone").
    """
    parts = []
    if run_ids is None or len(run_ids) > 0:
        cat = stage_catalog(store, run_ids, study_id)
        if not cat.empty:
            parts.append(
                cat[["key", "label", "checkpoint_id", "run_id", "stage_index", "stage"]].assign(
                    group=cat["run_label"]
                )
            )
    if include_standalone:
        sa = standalone_checkpoints(store)
        if not sa.empty:
            parts.append(
                pd.DataFrame(
                    {
                        "key": sa["key"],
                        "label": sa["label"],
                        "checkpoint_id": sa["checkpoint_id"],
                        "run_id": None,
                        "stage_index": None,
                        "stage": None,
                        "group": "standalone",
                    }
                )  # fmt: skip
            )
    if not parts:
        return pd.DataFrame(
            columns=["key", "label", "checkpoint_id", "run_id", "stage_index", "stage", "group"]
        )
    df = pd.concat(parts, ignore_index=True)
    # A label must be unique within a selection (it names a line in a figure).
    dup = df["label"].duplicated(keep=False)
    df.loc[dup, "label"] = df.loc[dup, "label"] + " [" + df.loc[dup, "group"].astype(str) + "]"
    return df


def probe_sets(store: Store, checkpoint_ids: Sequence[str] | None = None) -> list[str]:
    """Probe sets with results (for the given checkpoints), ``general`` first."""
    ids = _as_list(checkpoint_ids)
    if checkpoint_ids is not None and not ids:
        return []
    sql = "SELECT DISTINCT probe_set FROM probes"
    if ids:
        sql += f" WHERE checkpoint_id IN ({_marks(ids)})"
    names = sorted(store.query(sql, ids)["probe_set"].astype(str))
    return sorted(names, key=lambda n: (n != "general", n))


def latest_probes(
    store: Store,
    checkpoint_ids: Sequence[str] | None = None,
    probe_set: str | Sequence[str] | None = None,
    prefer_config: str | None = None,
) -> pd.DataFrame:
    """The newest probe per (checkpoint, probe set): probe_key, checkpoint_id, probe_set,
    n_prompts, n_tokens, n_layers, created_at, config_json and ``settings`` (its probe settings
    in words, :func:`probe_settings_label`: the same weights read differently under other
    settings, e.g. effective rank grows with the number of tokens). With ``prefer_config`` (a
    probes.config_json) a probe under those settings wins over newer ones where one exists."""
    where, params = [], []
    ids = _as_list(checkpoint_ids)
    if checkpoint_ids is not None:
        if not ids:
            return pd.DataFrame(columns=["probe_key", "checkpoint_id", "probe_set", "n_layers",
                                         "config_json", "settings"])  # fmt: skip
        where.append(f"checkpoint_id IN ({_marks(ids)})")
        params += ids
    if probe_set is not None:
        sets = [probe_set] if isinstance(probe_set, str) else list(probe_set)
        where.append(f"probe_set IN ({_marks(sets)})")
        params += sets
    sql = (
        "SELECT probe_key, checkpoint_id, probe_set, n_prompts, n_tokens, n_layers, created_at, "
        "config_json FROM probes" + (f" WHERE {' AND '.join(where)}" if where else "")
        + " QUALIFY row_number() OVER (PARTITION BY checkpoint_id, probe_set "
        "ORDER BY coalesce(config_json = ?, false) DESC, created_at DESC, probe_key) = 1"
    )  # fmt: skip
    df = store.query(sql, [*params, prefer_config])
    df["settings"] = [probe_settings_label(c) for c in df["config_json"]]
    return df


def probe_settings_choices(store: Store, checkpoint_ids: Sequence[str]) -> dict[str, str]:
    """config_json → settings label of every probe of these checkpoints, newest first."""
    ids = _as_list(checkpoint_ids)
    if not ids:
        return {}
    df = store.query(
        f"SELECT config_json, max(created_at) AS newest FROM probes WHERE checkpoint_id IN "
        f"({_marks(ids)}) GROUP BY config_json ORDER BY newest DESC",
        ids,
    )
    return {c: probe_settings_label(c) for c in df["config_json"]}


def probe_settings_label(config_json: str | None) -> str:
    """A probe's settings in words: prompts used, tokens per prompt, sampled tokens, seed."""
    try:
        cfg = json.loads(config_json or "{}")
    except json.JSONDecodeError:
        return "unknown settings"
    prompts = cfg.get("max_prompts")
    return (f"{'all' if prompts is None else prompts} prompts · ≤{cfg.get('max_length', '?')} "
            f"tokens each · {cfg.get('n_samples', '?')} sampled tokens · seed {cfg.get('seed', 0)}")  # fmt: skip


def evals_rows(store: Store, column: str, ids: Sequence[str]) -> pd.DataFrame:
    """The ``evals`` rows whose ``column`` (``run_id`` or ``checkpoint_id``) is one of ``ids``:
    that column, stage, eval, metric, value, n, ci_low, ci_high (NULL where a read-only store
    of an older file lacks the interval columns) and ``col`` = ``<eval>_<metric>``."""
    columns = [column, "stage", "eval", "metric", "value", "n", "ci_low", "ci_high", "col"]
    if not ids:
        return pd.DataFrame(columns=columns)
    have = store.columns("evals")
    extra = ", ".join(c if c in have else f"NULL AS {c}" for c in ("n", "ci_low", "ci_high"))
    ev = store.query(
        f"SELECT {column}, stage, eval, metric, value, {extra} FROM evals "
        f"WHERE {column} IN ({_marks(ids)})",
        list(ids),
    )
    ev["col"] = ev["eval"].astype(str) + "_" + ev["metric"].astype(str)
    return ev


def pivot_evals(ev: pd.DataFrame, index: list[str], intervals: bool = False) -> pd.DataFrame:
    """:func:`evals_rows` wide, one row per ``index`` value: a ``<eval>_<metric>`` column of
    values, and with ``intervals`` its ``_lo`` / ``_hi`` (the stored 95 % interval) and ``_n``
    (items scored) beside it; a column whose every entry is NULL is left out."""
    parts = (
        {"": "value", "_lo": "ci_low", "_hi": "ci_high", "_n": "n"} if intervals else {"": "value"}
    )
    wide = None
    for suffix, source in parts.items():
        ev[source] = pd.to_numeric(ev[source], errors="coerce")
        part = ev.pivot_table(index=index, columns="col", values=source, aggfunc="mean")
        part.columns = [f"{c}{suffix}" for c in part.columns]
        wide = part if wide is None else wide.join(part)
    wide = wide.reset_index()
    wide.columns.name = None
    return wide


def evals_wide(store: Store, run_ids: Sequence[str], intervals: bool = False) -> pd.DataFrame:
    """Evals of the runs' stages, one row per (run_id, stage_index): ``<eval>_<metric>``
    columns, plus ``plasticity_auc_rel`` (AUC ÷ the run's stage-0 AUC) when available.

    ``intervals=True`` adds ``<eval>_<metric>_lo`` / ``_hi`` (the stored 95 % interval, NaN
    where a score has none or predates them) and ``_n`` (items scored) per column."""
    ids = _as_list(run_ids)
    if not ids:
        return pd.DataFrame(columns=["run_id", "stage_index"])
    ev = evals_rows(store, "run_id", ids)
    if ev.empty:
        return pd.DataFrame(columns=["run_id", "stage_index"])
    ev["stage_index"] = ev["stage"].astype(str).str.split(":").str[0].astype(int)
    wide = pivot_evals(ev, ["run_id", "stage_index"], intervals)
    if "plasticity_auc" in wide:
        base = wide[wide["stage_index"] == 0].set_index("run_id")["plasticity_auc"]
        wide["plasticity_auc_rel"] = wide["plasticity_auc"] / wide["run_id"].map(base)
    return wide
