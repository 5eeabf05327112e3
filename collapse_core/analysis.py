"""Study summaries: the intervention comparison and the per-stage table. The hypothesis test
itself (checkpoint table, metric lists, estimators, verdicts) lives in
:mod:`collapse_core.hypothesis`, shared with the Hypothesis page and the report.

``compare_arms(store, study_id)``: per intervention arm vs baseline (paired by order and seed),
Δ of collapse metrics, outcomes and stage behaviour at the end of each chain, over its trained
stages and at every stage, with a bootstrap CI across the pairs when there are enough
(``arm_comparison_text`` prints it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .errors import CollapseError
from .hypothesis import (  # noqa: F401
    COLLAPSE_METRICS,
    MIN_LINEAGES,
    OUTCOMES,
    analyze_study,
    checkpoint_table,
)
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


#: What the arm comparison reports, the one list for the CLI, the Hypothesis page and the
#: report: (Δ column, checkpoint-table column, label), with Δ = arm − baseline.
ARM_QUANTITIES: tuple[tuple[str, str, str], ...] = (
    ("d_effective_rank_mid", "effective_rank@mid", "erank mid"),
    ("d_effective_rank_last", "effective_rank@last", "erank last"),
    ("d_anisotropy", "anisotropy_cosine@mean", "anisotropy"),
    ("d_plasticity_auc_rel", "plasticity_auc_rel", "plasticity (rel)"),
    ("d_ood_accuracy", "ood_accuracy", "OOD acc"),
    ("d_ood_ece", "ood_ece", "OOD ECE"),
    ("d_stage_heldout_loss", "stage_behaviour", "own-stage loss"),
)
#: Reading the Δs: which direction is the better one.
ARM_READING = (
    "For collapse, higher effective rank and lower anisotropy are better; for plasticity, "
    "OOD ECE and own-stage loss, lower is better."
)
#: A CI over fewer independent pairs is not shown (the hypothesis test's lineage minimum).
MIN_ARM_PAIRS = MIN_LINEAGES


def _mean_ci(values: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap CI of the mean over independent units (NaN with fewer than
    :data:`MIN_ARM_PAIRS`)."""
    if values.size < MIN_ARM_PAIRS:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(n_boot, values.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def with_stage_behaviour(table: pd.DataFrame) -> pd.DataFrame:
    """``table`` (a :func:`checkpoint_table`) plus ``stage_behaviour``: each row's held-out
    loss on its own stage's data (NaN at stage 0 and where it was not evaluated)."""
    return table.assign(stage_behaviour=[
        row.get(f"{row['stage']}_heldout_loss", np.nan) for _, row in table.iterrows()
    ])  # fmt: skip


def compare_arms(
    store: Store, study_id: str, n_boot: int = 1000, probe_set: str | None = None
) -> pd.DataFrame:
    """Δ (arm − baseline) per intervention arm, paired by (order, seed): at the end of each
    chain, averaged over its trained stages (k ≥ 1; stage 0 is the shared start), and at each
    stage. The unit is a pair of runs, so the 95 % CI (``<d>_lo``, ``<d>_hi``: percentile
    bootstrap of the mean over pairs) appears with ≥ :data:`MIN_ARM_PAIRS` pairs; at one stage,
    pairs that are the same two checkpoints (orders sharing a prefix) count once. Columns:
    arm, at, pairs, then ``d_<quantity>`` (and its CI) for :data:`ARM_QUANTITIES`."""
    table = checkpoint_table(store, study_id, probe_set)
    if table.empty or "baseline" not in set(table["arm"]):
        return pd.DataFrame()
    table = with_stage_behaviour(table)
    names = {col: name for name, col, _ in ARM_QUANTITIES if col in table}
    columns = list(names)
    base = table[table["arm"] == "baseline"]
    rows: list[dict[str, Any]] = []

    def summarise(arm: str, at: str, diffs: pd.DataFrame) -> None:
        row: dict[str, Any] = {"arm": arm, "at": at, "pairs": len(diffs)}
        for col in columns:
            values = diffs[col].dropna().to_numpy(dtype=float)
            name = names[col]
            row[name] = float(values.mean()) if values.size else np.nan
            row[f"{name}_lo"], row[f"{name}_hi"] = _mean_ci(values, n_boot)
        rows.append(row)

    for arm in sorted(set(table["arm"]) - {"baseline"}):
        merged = table[table["arm"] == arm].merge(
            base, on=["order", "seed", "stage_index"], suffixes=("", "_base")
        )
        if merged.empty:
            continue
        diffs = merged[["order", "seed", "stage_index", "stage", "checkpoint_id",
                        "checkpoint_id_base"]].copy()  # fmt: skip
        for col in columns:
            diffs[col] = merged[col] - merged[f"{col}_base"]
        last = diffs.groupby(["order", "seed"], sort=False)["stage_index"].idxmax()
        summarise(arm, "end", diffs.loc[last])
        trained = diffs[diffs["stage_index"] > 0]
        if not trained.empty:
            summarise(arm, "stages >= 1", trained.groupby(["order", "seed"])[columns].mean())
        for stage_index, grp in diffs.groupby("stage_index"):
            unique = grp.drop_duplicates(["checkpoint_id", "checkpoint_id_base"])
            summarise(arm, f"stage {stage_index}:{grp['stage'].iloc[0]}", unique)
    return pd.DataFrame(rows)


ARM_NOTE = (
    f"Δ = arm − baseline, paired by (order, seed); 95 % CI (bootstrap over pairs) shown with "
    f"≥ {MIN_ARM_PAIRS} pairs; * = CI excludes 0, any other Δ is within noise or untested."
)


def arm_comparison_frame(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`compare_arms` for display: arm, at, pairs and one text column per quantity,
    ``Δ [low, high]`` with ``*`` when the CI excludes 0 (see :data:`ARM_NOTE`)."""
    if table.empty:
        return pd.DataFrame()

    def cell(r: dict, name: str) -> str:
        value, low, high = r.get(name), r.get(f"{name}_lo"), r.get(f"{name}_hi")
        if value is None or not np.isfinite(value):
            return "-"
        if low is None or not np.isfinite(low):
            return f"{value:+.3f}"
        return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]{'*' if low > 0 or high < 0 else ''}"

    quantities = [(name, label) for name, _, label in ARM_QUANTITIES if name in table]
    records = table.to_dict("records")
    out = pd.DataFrame({"arm": [r["arm"] for r in records], "at": [r["at"] for r in records],
                        "pairs": [int(r["pairs"]) for r in records]})  # fmt: skip
    for name, label in quantities:
        out[f"Δ {label}"] = [cell(r, name) for r in records]
    return out


def fixed_width(frame: pd.DataFrame, right: Sequence[str] = ()) -> str:
    """A frame of display values as fixed-width text: each column as wide as its longest
    entry, ``right`` columns right-aligned, a rule under the header (the CLI's tables)."""
    rows = [list(map(str, frame.columns)), *([str(v) for v in row] for row in frame.to_numpy())]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    align = [">" if name in right else "<" for name in frame.columns]

    def line(row: list[str]) -> str:
        return "  ".join(f"{t:{a}{w}}" for t, a, w in zip(row, align, widths, strict=True)).rstrip()

    return "\n".join([line(rows[0]), "-" * len(line(rows[0])), *(line(r) for r in rows[1:])])


def arm_comparison_text(table: pd.DataFrame) -> str:
    """:func:`arm_comparison_frame` as fixed-width text (the CLI), with :data:`ARM_NOTE`."""
    frame = arm_comparison_frame(table)
    if frame.empty:
        return "(no intervention arm paired with a baseline run)"
    return f"{fixed_width(frame, right=['pairs'])}\n\n{ARM_NOTE}"


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
    table = with_stage_behaviour(table)
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
