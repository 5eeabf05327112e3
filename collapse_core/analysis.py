"""Study summaries: the intervention comparison and the per-stage table. The hypothesis test
itself (checkpoint table, metric lists, estimators, verdicts) lives in
:mod:`collapse_core.hypothesis`, shared with the Hypothesis page and the report.

``compare_arms(store, study_id)``: per intervention arm vs baseline (paired by order and seed),
Δ of collapse metrics, outcomes and stage behaviour at every stage and at the end of the chain,
with a bootstrap CI across the pairs when there are several.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from .errors import CollapseError
from .hypothesis import COLLAPSE_METRICS, OUTCOMES, analyze_study, checkpoint_table  # noqa: F401
from .store import Store


def resolve_study(store: Store, study: str) -> str:
    """``latest`` → the most recent study with at least one stored stage (a ``track`` that
    failed on its first checkpoint leaves an empty study, which ``latest`` skips); otherwise
    check the id (or name) exists, newest first when a name was used twice."""
    if study == "latest":
        df = store.query(
            "SELECT s.study_id FROM studies s WHERE EXISTS (SELECT 1 FROM runs r JOIN stages g "
            "ON g.run_id = r.run_id WHERE r.study_id = s.study_id) "
            "ORDER BY s.created_at DESC LIMIT 1"
        )
    else:
        df = store.query(
            "SELECT study_id FROM studies WHERE study_id = ? OR name = ? "
            "ORDER BY created_at DESC LIMIT 1",
            [study, study],
        )
    if df.empty:
        known = store.query("SELECT name FROM studies ORDER BY created_at DESC LIMIT 8")
        names = ", ".join(dict.fromkeys(str(n) for n in known["name"]))
        what = "no study with a finished stage" if study == "latest" else f"no study {study!r}"
        hint = f"known studies: {names}" if names else "run `python -m collapse_core run CONFIG`"
        raise CollapseError(f"{what} in the database; {hint}")
    return str(df["study_id"][0])


def correlate(store: Store, study_id: str, n_boot: int = 1000) -> pd.DataFrame:
    """The study's hypothesis tests (:func:`collapse_core.hypothesis.analyze_study`), stored;
    one row per (metric, layer position, outcome) with the verdict."""
    return analyze_study(store, study_id, n_boot=n_boot)


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
