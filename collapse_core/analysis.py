"""The hypothesis test and the intervention comparison of a study.

``correlate(store, study_id)``: across all checkpoints of the study (every stage of every run,
starting checkpoints included), Spearman ρ between each collapse metric and each outcome, with a
percentile bootstrap CI over checkpoints (Efron & Tibshirani 1993) and n. Stored in
``correlations``.

``compare_arms(store, study_id)``: per intervention arm vs baseline (paired by order and seed),
Δ of collapse metrics, outcomes and stage behaviour at every stage and at the end of the chain,
with a bootstrap CI across the pairs when there are several.

Collapse metrics per checkpoint are taken from the first probe set of the study, averaged over
layers (``layer = "mean"``) and at the middle and last layer. ``cka_drift`` = 1 − linear CKA
(Kornblith et al. 2019) between the checkpoint's and the run's starting checkpoint's stored
token vectors at the same layer (same texts, same sampled tokens).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from .errors import CollapseError
from .store import Store, decode_vectors

COLLAPSE_METRICS = (
    "effective_rank", "stable_rank", "anisotropy_cosine", "top_pc_share", "twonn_dimension",
    "homogeneity_gap", "dormant_fraction", "cka_drift",
)  # fmt: skip
OUTCOMES = ("plasticity_auc_rel", "ood_accuracy", "ood_ece")


def resolve_study(store: Store, study: str) -> str:
    """``latest`` → the most recent study id; otherwise check the id (or name) exists."""
    if study == "latest":
        df = store.query("SELECT study_id FROM studies ORDER BY created_at DESC LIMIT 1")
    else:
        df = store.query(
            "SELECT study_id FROM studies WHERE study_id = ? OR name = ? "
            "ORDER BY created_at DESC LIMIT 1",
            [study, study],
        )
    if df.empty:
        raise CollapseError(
            f"no study {study!r} in the database; run `python -m collapse_core run CONFIG` first"
        )
    return str(df["study_id"][0])


def checkpoint_table(store: Store, study_id: str) -> pd.DataFrame:
    """One row per (run, stage checkpoint): collapse metrics and outcomes, wide."""
    stages = store.query(
        "SELECT s.run_id, s.stage_index, s.stage, s.checkpoint_id, r.arm, r.seed, r.stage_order "
        "FROM stages s JOIN runs r USING (run_id) WHERE r.study_id = ? "
        "ORDER BY s.run_id, s.stage_index",
        [study_id],
    )
    if stages.empty:
        return stages
    ids = list(stages["checkpoint_id"].unique())
    marks = ",".join("?" * len(ids))
    lm = store.query(
        f"SELECT checkpoint_id, probe_set, probe_key, layer, metric, value FROM layer_metrics "
        f"WHERE checkpoint_id IN ({marks})",
        ids,
    )
    probe_set = _main_probe_set(lm)
    lm = lm[lm["probe_set"] == probe_set]
    rows: list[dict[str, Any]] = []
    evals = store.query(
        "SELECT run_id, checkpoint_id, stage, eval, metric, value FROM evals WHERE run_id IN "
        "(SELECT run_id FROM runs WHERE study_id = ?)",
        [study_id],
    )
    for st in stages.itertuples():
        row: dict[str, Any] = {
            "run_id": st.run_id, "stage_index": st.stage_index, "stage": st.stage,
            "checkpoint_id": st.checkpoint_id, "arm": st.arm, "seed": st.seed,
            "order": st.stage_order,
        }  # fmt: skip
        mine = lm[lm["checkpoint_id"] == st.checkpoint_id]
        if not mine.empty:
            n_layers = int(mine["layer"].max()) + 1
            for metric, grp in mine.groupby("metric"):
                by_layer = grp.groupby("layer")["value"].mean()
                row[f"{metric}@mean"] = float(by_layer.mean())
                mid = n_layers // 2
                if mid in by_layer.index:
                    row[f"{metric}@mid"] = float(by_layer[mid])
                row[f"{metric}@last"] = float(by_layer.iloc[-1])
        ev = evals[
            (evals["run_id"] == st.run_id) & (evals["stage"] == f"{st.stage_index}:{st.stage}")
        ]
        for e in ev.itertuples():
            row[f"{e.eval}_{e.metric}"] = e.value
        rows.append(row)
    table = pd.DataFrame(rows)
    if "plasticity_auc" in table:
        base = table[table["stage_index"] == 0].set_index("run_id")["plasticity_auc"]
        table["plasticity_auc_rel"] = table["plasticity_auc"] / table["run_id"].map(base)
    table = _add_cka_drift(store, table, probe_set, lm)
    return table


def _main_probe_set(lm: pd.DataFrame) -> str:
    sets = lm["probe_set"].value_counts()
    if sets.empty:
        raise CollapseError("the study's checkpoints have no probe results yet")
    return "general" if "general" in sets.index else str(sets.index[0])


def linear_cka_np(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) of two N×d matrices (uses the metrics package)."""
    from .metrics import linear_cka

    return float(linear_cka(x, y))


def _add_cka_drift(
    store: Store, table: pd.DataFrame, probe_set: str, lm: pd.DataFrame
) -> pd.DataFrame:
    keys = lm.groupby("checkpoint_id")["probe_key"].first().to_dict()
    drift_mid, drift_last = [], []
    base_of = table[table["stage_index"] == 0].set_index("run_id")["checkpoint_id"].to_dict()
    cache: dict[tuple[str, int], np.ndarray | None] = {}

    def vectors(ckpt: str, layer: int) -> np.ndarray | None:
        if (ckpt, layer) not in cache:
            key = keys.get(ckpt)
            df = store.query(
                "SELECT n, d, data FROM token_vectors WHERE probe_key = ? AND layer = ?",
                [key, layer],
            ) if key else pd.DataFrame()  # fmt: skip
            cache[(ckpt, layer)] = (
                None if df.empty else decode_vectors(bytes(df["data"][0]), int(df["n"][0]),
                                                     int(df["d"][0]))
            )  # fmt: skip
        return cache[(ckpt, layer)]

    n_layers = int(lm["layer"].max()) + 1 if not lm.empty else 0
    for row in table.itertuples():
        base = base_of.get(row.run_id)
        values = []
        for layer in (n_layers // 2, n_layers - 1):
            a, b = vectors(row.checkpoint_id, layer), vectors(base, layer) if base else None
            ok = a is not None and b is not None and a.shape == b.shape
            values.append(1.0 - linear_cka_np(a, b) if ok else np.nan)
        drift_mid.append(values[0])
        drift_last.append(values[1])
    table["cka_drift@mid"] = drift_mid
    table["cka_drift@last"] = drift_last
    table["cka_drift@mean"] = (table["cka_drift@mid"] + table["cka_drift@last"]) / 2
    return table


def bootstrap_spearman(
    x: np.ndarray, y: np.ndarray, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Spearman ρ of (x, y) and its 95 % percentile bootstrap CI over resampled pairs."""
    rho = float(spearmanr(x, y).statistic)
    rng = np.random.default_rng(seed)
    n = len(x)
    boots = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if np.unique(x[idx]).size < 2 or np.unique(y[idx]).size < 2:
            continue
        boots.append(spearmanr(x[idx], y[idx]).statistic)
    if not boots:
        return rho, np.nan, np.nan
    lo, hi = np.nanpercentile(boots, [2.5, 97.5])
    return rho, float(lo), float(hi)


def correlate(store: Store, study_id: str, n_boot: int = 1000) -> pd.DataFrame:
    """Spearman ρ (bootstrap CI, n) of every collapse metric vs every outcome; stored."""
    table = checkpoint_table(store, study_id)
    if table.empty:
        raise CollapseError(f"study {study_id} has no finished stages yet")
    rows = []
    for metric in COLLAPSE_METRICS:
        for where in ("mean", "mid", "last"):
            col = f"{metric}@{where}"
            if col not in table:
                continue
            for outcome in OUTCOMES:
                if outcome not in table:
                    continue
                sub = table[[col, outcome]].dropna()
                if len(sub) < 3 or sub[col].nunique() < 2 or sub[outcome].nunique() < 2:
                    continue
                rho, lo, hi = bootstrap_spearman(
                    sub[col].to_numpy(), sub[outcome].to_numpy(), n_boot
                )
                rows.append({"study_id": study_id, "collapse_metric": metric, "outcome": outcome,
                             "layer": where, "n": len(sub), "spearman": rho, "ci_low": lo,
                             "ci_high": hi, "created_at": dt.datetime.now()})  # fmt: skip
    result = pd.DataFrame(rows)
    with store.transaction() as con:
        con.execute("DELETE FROM correlations WHERE study_id = ?", [study_id])
        store.insert_df(con, "correlations", result)
    return result


def compare_arms(store: Store, study_id: str, n_boot: int = 1000) -> pd.DataFrame:
    """Δ (arm − baseline) per stage and at the end of the chain, paired by order and seed."""
    table = checkpoint_table(store, study_id)
    if table.empty or "baseline" not in set(table["arm"]):
        return pd.DataFrame()
    table = table.copy()
    table["stage_behaviour"] = [
        row.get(f"{row['stage']}_heldout_loss", np.nan) for _, row in table.iterrows()
    ]
    quantities = {
        "d_effective_rank": "effective_rank@mean", "d_anisotropy": "anisotropy_cosine@mean",
        "d_plasticity_auc_rel": "plasticity_auc_rel", "d_ood_accuracy": "ood_accuracy",
        "d_ood_ece": "ood_ece", "d_stage_heldout_loss": "stage_behaviour",
    }  # fmt: skip
    base = table[table["arm"] == "baseline"]
    rows = []
    for arm in sorted(set(table["arm"]) - {"baseline"}):
        other = table[table["arm"] == arm]
        merged = other.merge(base, on=["order", "seed", "stage_index"], suffixes=("", "_base"))
        if merged.empty:
            continue
        last = merged["stage_index"].max()
        for label, sel in (("end", merged["stage_index"] == last), ("all stages", slice(None))):
            part = merged[sel] if not isinstance(sel, slice) else merged
            row: dict[str, Any] = {"arm": arm, "at": label, "pairs": len(part)}
            for name, col in quantities.items():
                if col in part and f"{col}_base" in part:
                    diff = (part[col] - part[f"{col}_base"]).dropna().to_numpy()
                    row[name] = float(diff.mean()) if diff.size else np.nan
                    if diff.size > 1:
                        rng = np.random.default_rng(0)
                        means = [rng.choice(diff, diff.size).mean() for _ in range(n_boot)]
                        row[f"{name}_ci"] = tuple(np.percentile(means, [2.5, 97.5]).round(4))
            rows.append(row)
        for stage_index, grp in merged.groupby("stage_index"):
            row = {"arm": arm, "at": f"stage {stage_index}:{grp['stage'].iloc[0]}",
                   "pairs": len(grp)}  # fmt: skip
            for name, col in quantities.items():
                if col in grp and f"{col}_base" in grp:
                    row[name] = float((grp[col] - grp[f"{col}_base"]).mean())
            rows.append(row)
    return pd.DataFrame(rows)


STAGE_COLUMNS = [
    ("effective_rank@mid", "erank mid"), ("effective_rank@last", "erank last"),
    ("anisotropy_cosine@mean", "aniso"), ("plasticity_auc_rel", "plast rel"),
    ("ood_accuracy", "OOD acc"), ("ood_ece", "ECE"), ("stage_behaviour", "own loss"),
]  # fmt: skip


def stage_table(store: Store, study_id: str) -> pd.DataFrame:
    """Per-stage headline table of a study (one row per run × stage)."""
    table = checkpoint_table(store, study_id)
    if table.empty:
        return table
    table["stage_behaviour"] = [
        row.get(f"{row['stage']}_heldout_loss", np.nan) for _, row in table.iterrows()
    ]
    for extra in ("dpo_preference_accuracy", "safety_refusal_rate", "safety_over_refusal_rate",
                  "math_answer_accuracy"):  # fmt: skip
        if extra not in table:
            table[extra] = np.nan
    return table


def stage_table_text(store: Store, study_id: str) -> str:
    """The per-stage table as fixed-width text for the CLI and closing notes."""
    table = stage_table(store, study_id)
    if table.empty:
        return "(no finished stages)"
    cols = [(c, n) for c, n in STAGE_COLUMNS if c in table]
    extra = [
        ("dpo_preference_accuracy", "pref acc"),
        ("safety_refusal_rate", "refuse"),
        ("safety_over_refusal_rate", "over-ref"),
        ("math_answer_accuracy", "math acc"),
        ("code_pass_at_1", "pass@1"),
        ("safety_generated_refusal_rate", "gen refuse"),
        ("safety_generated_over_refusal_rate", "gen over"),
    ]
    cols += [(c, n) for c, n in extra if c in table]
    out = []
    for arm, grp in table.groupby(["arm", "seed", "order"], sort=False):
        out.append(f"arm {arm[0]} · seed {arm[1]} · order {arm[2]}")
        header = f"{'stage':<12}" + "".join(f"{n:>11}" for _, n in cols)
        out += [header, "-" * len(header)]
        for _, row in grp.iterrows():
            cells = "".join(
                f"{'-' if pd.isna(row.get(c)) else f'{row.get(c):.3f}':>11}" for c, _ in cols
            )
            out.append(f"{row['stage_index']}:{row['stage']:<10}" + cells)
        out.append("")
    return "\n".join(out)
