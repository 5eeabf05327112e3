"""The hypothesis test of a study: does representation collapse go with lost plasticity, worse
OOD accuracy and worse calibration? One checkpoint table, one metric list and one estimator for
``python -m collapse_core analyze``, the Hypothesis page and the report.

Why not just the pooled Spearman ρ across all checkpoints: later stages differ in everything
(stage index confounds both metric and outcome), the checkpoints of one run are not independent,
and the shared base checkpoint appears once per run. So, per (collapse metric @ layer position,
outcome):

1. **Independent checkpoints.** Identical weights (same ``checkpoint_id``, e.g. the shared base)
   count once; their outcomes are averaged. Runs that share a *trained* checkpoint (e.g. two
   orders that both start with the same sft stage and seed) form one *lineage*; lineages are the
   independent units ("independent runs").
2. **Within-stage association** (primary effect size): stratified Spearman ρ_w, the Pearson
   correlation of ranks centred within each stage index (strata with one checkpoint drop out,
   so the shared base never counts): ρ_w = Σ_s Σ_i r̃x_i r̃y_i / √(Σ r̃x² Σ r̃y²).
3. **Permutation test**: y shuffled within stage strata (exchangeable under "no within-stage
   association"), two-sided p = (1 + #|ρ*| ≥ |ρ_w|) / (1 + B) (Good 2005, *Permutation tests*).
4. **Cluster bootstrap** over lineages (Field & Welsh 2007): lineages resampled with
   replacement, ρ_w recomputed with multiplicity weights; 95 % percentile CI.
5. **Fixed effects**: OLS of z-scored outcome on z-scored metric + C(stage index) + C(lineage)
   (statsmodels), cluster-robust SE by lineage; the standardised slope β and its p. The lineage
   effects are left out when every lineage has one within-stage point (they would absorb it).
6. **Verdict** (per row): *supported* when the Benjamini–Hochberg q of the permutation p over
   all rows of the study is < 0.05, the bootstrap CI excludes 0 and β (when estimable) has the
   same sign as ρ_w,
   with that sign the hypothesised one (:data:`COLLAPSE_DIRECTION` × :data:`OUTCOME_HARM`);
   *contradicted* when the same holds with the opposite sign; *inconclusive* otherwise, and
   always with fewer than :data:`MIN_LINEAGES` lineages or :data:`MIN_WITHIN` usable points.

The pooled ρ (deduplicated checkpoints, pair bootstrap CI) is kept next to it for comparison.
Results are stored in ``hypothesis_tests`` (and the pooled figure in ``correlations``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .catalog import _marks, evals_wide, latest_probes, stage_catalog
from .errors import CollapseError
from .metrics.robust import ROBUST_METRICS
from .store import Store, decode_vectors

#: Sign of a metric's change when representations collapse more (+1: grows with collapse).
COLLAPSE_DIRECTION: dict[str, int] = {
    "effective_rank": -1,
    "stable_rank": -1,
    "participation_ratio": -1,
    "anisotropy_cosine": +1,
    "top_pc_share": +1,
    "alpha_req": +1,
    "twonn_dimension": -1,
    "homogeneity_gap": +1,
    "dormant_fraction": +1,
    "logit_lens_entropy": +1,
    "cka_drift": +1,
    **{robust: 0 for robust in ROBUST_METRICS},  # filled below from the raw metric
}
for _robust, _raw in ROBUST_METRICS.items():
    COLLAPSE_DIRECTION[_robust] = COLLAPSE_DIRECTION[_raw]

#: The collapse metrics tested, in display order (raw metric, then its robust companion).
COLLAPSE_METRICS: tuple[str, ...] = (
    "effective_rank", "effective_rank_robust", "stable_rank", "stable_rank_robust",
    "participation_ratio", "participation_ratio_robust", "anisotropy_cosine",
    "anisotropy_centred", "top_pc_share", "top_pc_share_robust", "alpha_req",
    "twonn_dimension", "homogeneity_gap", "dormant_fraction", "logit_lens_entropy", "cka_drift",
)  # fmt: skip

#: Outcomes tested against collapse metrics.
OUTCOMES: dict[str, str] = {
    "plasticity_auc_rel": "plasticity: loss-curve AUC ÷ start (higher = learns slower)",
    "ood_accuracy": "OOD accuracy",
    "ood_ece": "OOD ECE",
}
#: Short outcome names for axis and column titles.
OUTCOME_SHORT: dict[str, str] = {
    "plasticity_auc_rel": "plasticity (rel. AUC)",
    "ood_accuracy": "OOD accuracy",
    "ood_ece": "OOD ECE",
}
#: +1 when a higher outcome value is worse (the hypothesis: collapse → worse outcome).
OUTCOME_HARM: dict[str, int] = {"plasticity_auc_rel": +1, "ood_accuracy": -1, "ood_ece": +1}
#: Where a per-layer metric is read: middle layer, last layer, mean over layers.
LAYER_POSITIONS: tuple[str, ...] = ("mid", "last", "mean")

MIN_LINEAGES = 3
MIN_WITHIN = 5
ALPHA = 0.05
VERDICTS = ("supported", "contradicted", "inconclusive")

TEST_COLUMNS = [
    "collapse_metric", "layer", "outcome", "expected_sign", "verdict", "reason",
    "within_rho", "ci_low", "ci_high", "p_perm", "q_value", "fe_beta", "fe_p", "pooled_rho",
    "pooled_ci_low", "pooled_ci_high", "n_checkpoints", "n_within", "n_runs", "n_lineages",
]  # fmt: skip


def expected_sign(metric: str, outcome: str) -> int:
    """Hypothesised sign of the (metric, outcome) association: collapse direction × harm."""
    return COLLAPSE_DIRECTION.get(metric, 0) * OUTCOME_HARM.get(outcome, 0)


# -- the checkpoint table ------------------------------------------------------------------
def main_probe_set(store: Store, checkpoint_ids: Sequence[str]) -> str:
    """``general`` when the checkpoints were probed on it, else the most common probe set."""
    keys = latest_probes(store, checkpoint_ids)
    if keys.empty:
        raise CollapseError("the study's checkpoints have no probe results yet")
    counts = keys["probe_set"].value_counts()
    return "general" if "general" in counts.index else str(counts.index[0])


def checkpoint_table(store: Store, study_id: str, probe_set: str | None = None) -> pd.DataFrame:
    """One row per stage row of the study (a checkpoint shared by runs appears once per run).

    Columns: run_id, run_label, arm, seed, order, stage_index, stage, stage_label, label,
    checkpoint_id; ``<metric>@mid|last|mean`` for every metric of :data:`COLLAPSE_METRICS`
    found in the newest probe of ``probe_set`` (default :func:`main_probe_set`; middle layer =
    ``n_layers // 2`` with layers 0..L, 0 = embeddings); every ``<eval>_<metric>`` of
    :func:`evals_wide`; the :data:`OUTCOMES` (NaN where not measured).
    """
    cat = stage_catalog(store, study_id=study_id)
    if cat.empty:
        return pd.DataFrame()
    ids = list(cat["checkpoint_id"].unique())
    probe_set = probe_set or main_probe_set(store, ids)
    keys = latest_probes(store, ids, probe_set)
    vals = pd.DataFrame(columns=["checkpoint_id", "layer", "metric", "value"])
    if not keys.empty:
        pk, wanted = list(keys["probe_key"]), [m for m in COLLAPSE_METRICS if m != "cka_drift"]
        vals = store.query(
            f"SELECT checkpoint_id, layer, metric, value FROM layer_metrics WHERE probe_key IN "
            f"({_marks(pk)}) AND metric IN ({_marks(wanted)})",
            pk + wanted,
        )
    feats = []
    for ckpt, grp in vals.groupby("checkpoint_id"):
        n = int(grp["layer"].max()) + 1
        row: dict[str, Any] = {"checkpoint_id": ckpt}
        for metric, g in grp.groupby("metric"):
            by_layer = g.groupby("layer")["value"].mean()
            row[f"{metric}@mean"] = float(by_layer.mean())
            row[f"{metric}@mid"] = float(by_layer.get(n // 2, np.nan))
            row[f"{metric}@last"] = float(by_layer.get(n - 1, np.nan))
        feats.append(row)
    runs = store.query(
        'SELECT run_id, stage_order AS "order" FROM runs WHERE study_id = ?', [study_id]
    )
    df = cat[["run_id", "run_label", "arm", "seed", "stage_index", "stage", "stage_label",
              "label", "checkpoint_id"]].merge(runs, on="run_id", how="left")  # fmt: skip
    if feats:
        df = df.merge(pd.DataFrame(feats), on="checkpoint_id", how="left")
    df = df.merge(evals_wide(store, list(cat["run_id"].unique())), on=["run_id", "stage_index"],
                  how="left")  # fmt: skip
    for outcome in OUTCOMES:
        if outcome not in df:
            df[outcome] = np.nan
    return _add_cka_drift(store, df, keys)


def _add_cka_drift(store: Store, table: pd.DataFrame, keys: pd.DataFrame) -> pd.DataFrame:
    """``cka_drift@mid|last|mean`` = 1 − linear CKA (Kornblith et al. 2019) between the stored
    token vectors of the checkpoint and of its run's stage-0 checkpoint (same texts, same
    sampled tokens) at the middle and last layer; mean = average of the two."""
    from .metrics import linear_cka

    key_of = keys.set_index("checkpoint_id")["probe_key"].to_dict() if not keys.empty else {}
    n_layers = int(keys["n_layers"].max()) if not keys.empty else 0
    base_of = table[table["stage_index"] == 0].set_index("run_id")["checkpoint_id"].to_dict()
    cache: dict[tuple[str, int], np.ndarray | None] = {}

    def vectors(ckpt: str | None, layer: int) -> np.ndarray | None:
        key = key_of.get(ckpt)
        if key is None:
            return None
        if (key, layer) not in cache:
            df = store.query(
                "SELECT n, d, data FROM token_vectors WHERE probe_key = ? AND layer = ?",
                [key, layer],
            )
            cache[(key, layer)] = None if df.empty else decode_vectors(
                bytes(df["data"][0]), int(df["n"][0]), int(df["d"][0]))  # fmt: skip
        return cache[(key, layer)]

    for where, layer in (("mid", n_layers // 2), ("last", n_layers - 1)):
        drift = []
        for row in table.itertuples():
            a, b = vectors(row.checkpoint_id, layer), vectors(base_of.get(row.run_id), layer)
            ok = a is not None and b is not None and a.shape == b.shape
            drift.append(1.0 - float(linear_cka(a, b)) if ok else np.nan)
        table[f"cka_drift@{where}"] = drift
    table["cka_drift@mean"] = (table["cka_drift@mid"] + table["cka_drift@last"]) / 2
    return table


def lineages(table: pd.DataFrame) -> dict[str, str]:
    """run_id → lineage id: runs that share a trained checkpoint (stage_index > 0) are one
    lineage (union-find); the shared starting checkpoint does not link runs."""
    parent = {r: r for r in table["run_id"].unique()}

    def find(r: str) -> str:
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    trained = table[table["stage_index"] > 0]
    for _, grp in trained.groupby("checkpoint_id"):
        runs = list(grp["run_id"].unique())
        for other in runs[1:]:
            a, b = find(runs[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return {r: find(r) for r in parent}


def independent_checkpoints(table: pd.DataFrame) -> pd.DataFrame:
    """One row per distinct ``checkpoint_id``: metrics (identical by construction) from the first
    row, numeric eval/outcome columns averaged over the rows, ``lineage`` (see :func:`lineages`;
    ``"shared"`` when the checkpoint is in several lineages, e.g. the base) and ``n_rows``."""
    if table.empty:
        return table.assign(lineage=pd.Series(dtype=str), n_rows=pd.Series(dtype=int))
    lin = table["run_id"].map(lineages(table))
    table = table.assign(lineage=lin)
    numeric = [c for c in table.select_dtypes("number").columns if "@" not in c
               and c not in ("stage_index", "seed")]  # fmt: skip
    first = table.groupby("checkpoint_id", sort=False).first()
    first[numeric] = table.groupby("checkpoint_id", sort=False)[numeric].mean()
    first["n_rows"] = table.groupby("checkpoint_id", sort=False).size()
    shared = table.groupby("checkpoint_id", sort=False)["lineage"].nunique() > 1
    first.loc[shared, "lineage"] = "shared"
    first["stage_index"] = table.groupby("checkpoint_id", sort=False)["stage_index"].min()
    return first.reset_index()


# -- estimators ----------------------------------------------------------------------------
def _codes(values: Sequence[Any]) -> np.ndarray:
    return pd.factorize(pd.Series(list(values)).astype(str))[0]


def _weighted_centred_ranks(v: np.ndarray, same: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mid-ranks of ``v`` within strata (``same``: n×n same-stratum mask) of a sample where row
    i appears ``w[..., i]`` times, centred on the stratum's mean rank; shape of ``w``."""
    less = ((v[None, :] < v[:, None]) & same).astype(float)
    equal = ((v[None, :] == v[:, None]) & same).astype(float)
    rank = w @ less.T + (w @ equal.T + 1.0) / 2.0
    total = w @ same.T.astype(float)
    return rank - (total + 1.0) / 2.0


def stratified_spearman(
    x: Sequence[float], y: Sequence[float], strata: Sequence[Any], weights: Any = None
) -> np.ndarray | float:
    """Within-stratum Spearman ρ_w (see module docstring); ``weights`` (B × n multiplicities)
    gives one ρ_w per row. NaN where the centred ranks have no variance."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    codes = _codes(strata)
    same = codes[None, :] == codes[:, None]
    w = np.ones((1, x.size)) if weights is None else np.atleast_2d(np.asarray(weights, float))
    rx = _weighted_centred_ranks(x, same, w)
    ry = _weighted_centred_ranks(y, same, w)
    num = (w * rx * ry).sum(1)
    den = np.sqrt((w * rx * rx).sum(1) * (w * ry * ry).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)
    return float(rho[0]) if weights is None else rho


def within_permutation_p(
    x: Sequence[float], y: Sequence[float], strata: Sequence[Any], n_perm: int = 2000,
    seed: int = 0,
) -> float:  # fmt: skip
    """Two-sided permutation p of ρ_w with y shuffled within strata: (1 + #|ρ*| ≥ |ρ_w|)/(1 + B)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    observed = stratified_spearman(x, y, strata)
    if not np.isfinite(observed):
        return float("nan")
    codes = _codes(strata)
    rng = np.random.default_rng(seed)
    perm = np.tile(np.arange(x.size), (n_perm, 1))
    for c in np.unique(codes):
        idx = np.flatnonzero(codes == c)
        if idx.size > 1:
            perm[:, idx] = idx[np.argsort(rng.random((n_perm, idx.size)), axis=1)]
    # ρ_w of (x, y[perm]) without re-ranking: within-stratum ranks of y only move with y.
    same = codes[None, :] == codes[:, None]
    ones = np.ones((1, x.size))
    rx = _weighted_centred_ranks(x, same, ones)[0]
    ry = _weighted_centred_ranks(y, same, ones)[0]
    den = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    null = (rx[None, :] * ry[perm]).sum(1) / den
    return float((1 + np.sum(np.abs(null) >= abs(observed) - 1e-12)) / (1 + n_perm))


def cluster_bootstrap_ci(
    x: Sequence[float], y: Sequence[float], strata: Sequence[Any], clusters: Sequence[Any],
    n_boot: int = 1000, seed: int = 0, level: float = 0.95,
) -> tuple[float, float]:  # fmt: skip
    """Percentile CI of ρ_w with whole clusters (lineages) resampled with replacement."""
    codes = _codes(clusters)
    n_clusters = int(codes.max()) + 1 if codes.size else 0
    if n_clusters < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_clusters, (n_boot, n_clusters))
    counts = np.stack([np.bincount(d, minlength=n_clusters) for d in drawn])
    boots = stratified_spearman(x, y, strata, weights=counts[:, codes])
    boots = boots[np.isfinite(boots)]
    if boots.size < n_boot // 2:
        return float("nan"), float("nan")
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(boots, [tail, 100 - tail])
    return float(lo), float(hi)


def fixed_effects(
    x: Sequence[float], y: Sequence[float], strata: Sequence[Any], clusters: Sequence[Any]
) -> dict[str, float]:
    """OLS z(y) ~ z(x) + C(stratum) + C(cluster) (statsmodels), cluster-robust SE by cluster:
    {"beta", "p"} for the standardised slope; NaN when the design leaves no residual df or has
    fewer than two clusters (no cluster-robust SE)."""
    import statsmodels.formula.api as smf

    df = pd.DataFrame({"x": np.asarray(x, float), "y": np.asarray(y, float),
                       "s": _codes(strata), "c": _codes(clusters)})  # fmt: skip
    nan = {"beta": float("nan"), "p": float("nan")}
    if df["x"].std() == 0 or df["y"].std() == 0:
        return nan
    df["x"] = (df["x"] - df["x"].mean()) / df["x"].std()
    df["y"] = (df["y"] - df["y"].mean()) / df["y"].std()
    # Cluster effects only when some cluster has several points: with one point per cluster
    # they would absorb every observation (the comparison across clusters is the one wanted).
    with_c = df["c"].value_counts().max() > 1
    terms = ["x"] + [f"C({c})" for c in ("s", "c") if df[c].nunique() > 1 and (c == "s" or with_c)]
    n_params = 2 + (df["s"].nunique() - 1) + ((df["c"].nunique() - 1) if with_c else 0)
    # Cluster-robust SEs need at least two clusters (statsmodels divides by n_groups - 1).
    if len(df) - n_params < 1 or df["c"].nunique() < 2:
        return nan
    try:
        fit = smf.ols("y ~ " + " + ".join(terms), df).fit(
            cov_type="cluster", cov_kwds={"groups": df["c"]}, use_t=True
        )
    except (ValueError, ZeroDivisionError, np.linalg.LinAlgError):
        return nan
    return {"beta": float(fit.params["x"]), "p": float(fit.pvalues["x"])}


def pooled_spearman(
    x: Sequence[float], y: Sequence[float], n_boot: int = 1000, seed: int = 0
) -> dict[str, float]:
    """Spearman ρ over all given points with a 95 % percentile pair-bootstrap CI (Efron &
    Tibshirani 1993): {"rho", "ci_low", "ci_high", "n"}; NaN with < 3 points or a constant."""
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(a.size)
    nan = {"rho": np.nan, "ci_low": np.nan, "ci_high": np.nan, "n": n}
    if n < 3 or np.unique(a).size < 2 or np.unique(b).size < 2:
        return nan
    strata = np.zeros(n)
    rho = stratified_spearman(a, b, strata)
    rng = np.random.default_rng(seed)
    counts = np.stack([np.bincount(d, minlength=n) for d in rng.integers(0, n, (n_boot, n))])
    boots = stratified_spearman(a, b, strata, weights=counts)
    boots = boots[np.isfinite(boots)]
    if boots.size == 0:
        return {**nan, "rho": rho}
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"rho": rho, "ci_low": float(lo), "ci_high": float(hi), "n": n}


def association(
    points: pd.DataFrame, feature: str, outcome: str, n_boot: int = 1000, n_perm: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Every estimator for one (feature, outcome) on :func:`independent_checkpoints` rows
    (feature = ``metric@position``). Returns the :data:`TEST_COLUMNS` fields except
    ``q_value``/``verdict``/``reason`` (see :func:`decide`)."""
    metric, _, where = feature.partition("@")
    out: dict[str, Any] = {"collapse_metric": metric, "layer": where, "outcome": outcome,
                           "expected_sign": expected_sign(metric, outcome)}  # fmt: skip
    if feature not in points or outcome not in points:
        sub = points.iloc[0:0]
    else:
        sub = points[np.isfinite(points[feature].astype(float))
                     & np.isfinite(points[outcome].astype(float))]  # fmt: skip
    pooled = pooled_spearman(sub.get(feature, []), sub.get(outcome, []), n_boot, seed)
    out.update(pooled_rho=pooled["rho"], pooled_ci_low=pooled["ci_low"],
               pooled_ci_high=pooled["ci_high"], n_checkpoints=len(sub),
               n_runs=int(sub["n_rows"].sum()) if len(sub) else 0)  # fmt: skip
    # Within-stage estimators: strata with ≥ 2 checkpoints, lineage known (not the shared base).
    sub = sub[sub["lineage"] != "shared"] if len(sub) else sub
    sizes = sub.groupby("stage_index")["checkpoint_id"].transform("size") if len(sub) else []
    sub = sub[np.asarray(sizes) >= 2] if len(sub) else sub
    out.update(n_within=len(sub), n_lineages=int(sub["lineage"].nunique()) if len(sub) else 0)
    nan = float("nan")
    out.update(within_rho=nan, ci_low=nan, ci_high=nan, p_perm=nan, fe_beta=nan, fe_p=nan)
    if len(sub) >= 3:
        x, y = sub[feature].to_numpy(float), sub[outcome].to_numpy(float)
        s, c = sub["stage_index"].to_numpy(), sub["lineage"].to_numpy()
        out["within_rho"] = stratified_spearman(x, y, s)
        if np.isfinite(out["within_rho"]):
            out["p_perm"] = within_permutation_p(x, y, s, n_perm, seed)
            out["ci_low"], out["ci_high"] = cluster_bootstrap_ci(x, y, s, c, n_boot, seed)
            fe = fixed_effects(x, y, s, c)
            out["fe_beta"], out["fe_p"] = fe["beta"], fe["p"]
    return out


def decide(row: dict[str, Any], q_value: float) -> tuple[str, str]:
    """(verdict, reason) for one row of :func:`association` with its BH ``q_value``."""
    if row["n_lineages"] < MIN_LINEAGES or row["n_within"] < MIN_WITHIN:
        return "inconclusive", (f"{row['n_lineages']} independent runs, {row['n_within']} "
                                f"within-stage points (need ≥ {MIN_LINEAGES} and ≥ {MIN_WITHIN})")  # fmt: skip
    rho, lo, hi = row["within_rho"], row["ci_low"], row["ci_high"]
    if not (np.isfinite(rho) and np.isfinite(lo) and np.isfinite(hi)):
        return "inconclusive", "metric or outcome does not vary within stages"
    if not q_value < ALPHA:
        return "inconclusive", f"within-stage permutation q = {q_value:.2f} ≥ {ALPHA}"
    if lo <= 0 <= hi:
        return "inconclusive", "cluster-bootstrap CI includes 0"
    if np.isfinite(row["fe_beta"]) and not np.sign(row["fe_beta"]) == np.sign(rho):
        return "inconclusive", "fixed-effects slope disagrees in sign"
    sign = int(np.sign(rho))
    if row["expected_sign"] == 0:
        return "inconclusive", "no hypothesised direction"
    if sign == row["expected_sign"]:
        return "supported", "within-stage association in the hypothesised direction"
    return "contradicted", "within-stage association opposite to the hypothesis"


def _bh(p: np.ndarray) -> np.ndarray:
    """Benjamini–Hochberg adjusted p-values (statsmodels ``fdr_bh``); NaN stays NaN."""
    from statsmodels.stats.multitest import multipletests

    q = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    if ok.any():
        q[ok] = multipletests(p[ok], method="fdr_bh")[1]
    return q


def test_table(
    table: pd.DataFrame,
    metrics: Sequence[str] = COLLAPSE_METRICS,
    positions: Sequence[str] = LAYER_POSITIONS,
    outcomes: Sequence[str] = tuple(OUTCOMES),
    n_boot: int = 1000,
    n_perm: int = 2000,
) -> pd.DataFrame:
    """:func:`association` + :func:`decide` for every (metric @ position, outcome) present in
    ``table`` (a :func:`checkpoint_table`), BH q over all rows; columns :data:`TEST_COLUMNS`."""
    points = independent_checkpoints(table)
    rows = []
    for metric in metrics:
        for where in positions:
            feature = f"{metric}@{where}"
            if feature not in points or points[feature].notna().sum() < 3:
                continue
            for outcome in outcomes:
                if outcome in points and points[outcome].notna().sum() >= 3:
                    rows.append(association(points, feature, outcome, n_boot, n_perm))
    if not rows:
        return pd.DataFrame(columns=TEST_COLUMNS)
    q = _bh(np.array([r["p_perm"] for r in rows], dtype=float))
    for row, q_value in zip(rows, q, strict=True):
        row["q_value"] = q_value
        row["verdict"], row["reason"] = decide(row, q_value)
    return pd.DataFrame(rows)[TEST_COLUMNS]


# -- storage and entry points --------------------------------------------------------------
def analyze_study(
    store: Store, study_id: str, probe_set: str | None = None, n_boot: int = 1000,
    n_perm: int = 2000,
) -> pd.DataFrame:  # fmt: skip
    """Run :func:`test_table` on the study and store it (``hypothesis_tests``; the pooled ρ
    also in ``correlations``), replacing the study's previous rows. Returns the table."""
    table = checkpoint_table(store, study_id, probe_set)
    if table.empty:
        raise CollapseError(f"study {study_id} has no finished stages yet")
    probe_set = probe_set or main_probe_set(store, list(table["checkpoint_id"]))
    tests = test_table(table, n_boot=n_boot, n_perm=n_perm)
    now = dt.datetime.now()
    stored = tests.assign(study_id=study_id, probe_set=probe_set, created_at=now)
    corr = pd.DataFrame({
        "study_id": study_id, "collapse_metric": tests["collapse_metric"],
        "outcome": tests["outcome"], "layer": tests["layer"], "n": tests["n_checkpoints"],
        "spearman": tests["pooled_rho"], "ci_low": tests["pooled_ci_low"],
        "ci_high": tests["pooled_ci_high"], "created_at": now,
    })  # fmt: skip
    with store.transaction() as con:
        con.execute("DELETE FROM hypothesis_tests WHERE study_id = ? AND probe_set = ?",
                    [study_id, probe_set])  # fmt: skip
        con.execute("DELETE FROM correlations WHERE study_id = ?", [study_id])
        store.insert_df(con, "hypothesis_tests", stored)
        store.insert_df(con, "correlations", corr)
    return tests


def stored_tests(store: Store, study_id: str, probe_set: str | None = None) -> pd.DataFrame:
    """The stored ``hypothesis_tests`` rows of a study (newest probe set run when not given)."""
    sql = f"SELECT {', '.join(TEST_COLUMNS)}, probe_set, created_at FROM hypothesis_tests " \
          "WHERE study_id = ?"  # fmt: skip
    params: list[Any] = [study_id]
    if probe_set:
        sql += " AND probe_set = ?"
        params.append(probe_set)
    return store.query(sql, params)


def study_tests(
    store: Store, study_id: str, probe_set: str | None = None, n_boot: int = 1000,
    n_perm: int = 2000,
) -> tuple[pd.DataFrame, str]:  # fmt: skip
    """The study's test table: (stored rows, ``"stored"``) when ``analyze`` stored them for
    this probe set, else (computed now without storing, ``"computed"``)."""
    stored = stored_tests(store, study_id, probe_set)
    if not stored.empty:
        return stored[TEST_COLUMNS].reset_index(drop=True), "stored"
    table = checkpoint_table(store, study_id, probe_set)
    if table.empty:
        return pd.DataFrame(columns=TEST_COLUMNS), "computed"
    return test_table(table, n_boot=n_boot, n_perm=n_perm), "computed"


def verdict_text(tests: pd.DataFrame, position: str | None = "mean") -> str:
    """The verdict table as fixed-width text (CLI, README, closing notes): one line per
    (metric, outcome) at ``position`` (None: every position)."""
    if tests.empty:
        return "(no collapse metric × outcome pair with ≥ 3 checkpoints)"
    rows = tests if position is None else tests[tests["layer"] == position]
    # Widths from the longest entry: "plasticity (rel. AUC)" ran into the verdict column.
    mw = max([28, *(len(str(m)) + 2 for m in rows["collapse_metric"])])
    ow = max([20, *(len(OUTCOME_SHORT.get(o, str(o))) + 2 for o in rows["outcome"])])
    head = (f"{'metric':<{mw}}{'@':<5}{'outcome':<{ow}}{'verdict':<14}{'ρ_w':>7}{'95% CI':>17}"
            f"{'p':>7}{'q':>7}{'β_FE':>7}{'pooled ρ':>10}{'runs':>6}")  # fmt: skip
    lines = [head, "-" * len(head)]

    def f(v: float, spec: str = "+.2f") -> str:
        return "-" if not np.isfinite(v) else format(v, spec)

    for r in rows.itertuples():
        ci = f"[{f(r.ci_low)}, {f(r.ci_high)}]" if np.isfinite(r.ci_low) else "-"
        lines.append(
            f"{r.collapse_metric:<{mw}}{r.layer:<5}{OUTCOME_SHORT.get(r.outcome, r.outcome):<{ow}}"
            f"{r.verdict:<14}{f(r.within_rho):>7}{ci:>17}{f(r.p_perm, '.3f'):>7}"
            f"{f(r.q_value, '.2f'):>7}{f(r.fe_beta):>7}{f(r.pooled_rho):>10}{r.n_lineages:>6}"
        )
    counts = rows["verdict"].value_counts()
    lines.append("")
    lines.append(", ".join(f"{counts.get(v, 0)} {v}" for v in VERDICTS)
                 + " (runs = independent lineages; ρ_w = within-stage Spearman)")  # fmt: skip
    return "\n".join(lines)
