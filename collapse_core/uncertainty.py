"""Sampling uncertainty of the per-layer metrics: 95 % CIs from resampling prompts.

The probe stores, per layer, a fixed-seed subsample of token hidden states with the prompt each
token came from (``token_vectors`` + ``token_samples``). Tokens of one prompt are not independent,
so the resampling unit is the prompt: B bootstrap replicates draw the prompts with replacement
(Davison & Hinkley 1997, §3.8 "multi-stage sampling": resample the top-level units) and every
subsample token of a drawn prompt enters with the prompt's multiplicity. Per replicate:

- spectral metrics (effective rank, stable rank, participation ratio, top-PC share, α-ReQ and
  their ``*_robust`` companions) from the multiplicity-weighted covariance of the subsample;
- ``anisotropy_cosine`` / ``anisotropy_centred``: mean cosine over pairs of distinct tokens;
- ``twonn_dimension``: TwoNN (Facco et al. 2017, the stored "fit" estimator) with neighbours
  among the distinct drawn tokens and each token's μ counted with its multiplicity.

What a CI covers (also in the README): the prompt-sampling noise of the probe set at a fixed
token subsample seed. TwoNN and the centred anisotropy are computed on that subsample
(v = θ̂_s); their CI is the *basic* bootstrap interval (Davison & Hinkley 1997, eq. 5.6)
[v − (q₉₇.₅ − θ̂_s), v + (θ̂_s − q₂.₅)], whose reflection also corrects the estimator's
finite-sample bias (a prompt drawn twice adds no new tokens, and the replicates' shift mimics
that of drawing fewer prompts), so it can exclude v where that bias exceeds the spread. The
other metrics are stored from all tokens (streamed moments) while the replicates come from the
384–512-token subsample, so the subsample's bias does not transfer: for rank-type metrics at
n < d it is far larger than the all-token value's (on SmolLM2 ``general`` at layer 0 even the
97.5th percentile of the effective-rank replicates lay 54 below θ̂_s, and the basic interval
put [437, 478] around a stored 383.6, excluding the value at all 31 stored layers). Their CI
is therefore the replicates' percentile spread re-centred from its median onto v,
[v − (q₅₀ − q₂.₅), v + (q₉₇.₅ − q₅₀)] (:func:`spread_interval`): the prompt-sampling spread of
a 384–512-token subsample, wider than the all-token value's own noise (conservative), with the
finite-sample bias of v not estimated. The next-token entropy and top-1 margin are means over
the subsample's tokens of the values stored with each token (``token_samples``), and the
logit-lens entropy the two-phase estimate of :mod:`collapse_core.lens` over its tokens of the
subsample (``token_vectors.lens_entropy`` and ``lens_proxy``), so their replicates are the
multiplicity-weighted means (for the lens: weighted difference estimates) over the drawn
tokens and v = θ̂_s. Metrics with
no CI: dormant fraction, mean norm, homogeneity (they need per-prompt sums the probe does not
keep), and the three per-token metrics of probes stored before capture version 4.
Results go to ``layer_metric_ci`` (probe_key, layer, metric, lo, hi, method, n_boot, n_prompts)
and the replicates to ``layer_metric_boot``. Stage-to-stage changes use the paired bootstrap
(:func:`paired_change_ci`): every probe of a probe set keeps the same token subsample and the
replicates use one seed, so replicate k of two probes drew the same prompts and their
difference resamples the change itself (the prompt effect shared by both stages cancels).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import pandas as pd

from . import metrics as M
from .catalog import _marks
from .lens import lens_estimate
from .store import Store, decode_vectors

N_BOOT = 100
LEVEL = 0.95
METHOD_SUBSAMPLE = "prompt bootstrap, basic interval (metric of the subsample itself)"
METHOD_SHIFTED = "prompt bootstrap of the subsample, percentile spread around the all-token value"
#: Metrics that get a CI, and whether the stored value comes from the subsample itself.
CI_METRICS: dict[str, bool] = {
    "effective_rank": False, "stable_rank": False, "participation_ratio": False,
    "top_pc_share": False, "alpha_req": False, "anisotropy_cosine": False,
    "effective_rank_robust": False, "stable_rank_robust": False,
    "participation_ratio_robust": False, "top_pc_share_robust": False,
    "anisotropy_centred": True, "twonn_dimension": True,
    "next_token_entropy": True, "top1_margin": True, "logit_lens_entropy": True,
}  # fmt: skip
#: Metrics that are means of a per-token value stored in ``token_samples`` (last layer only).
TOKEN_MEAN_METRICS = ("next_token_entropy", "top1_margin")


def _weighted_spectrum(x: np.ndarray, w: np.ndarray, drop: int) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending, length d) of the weighted covariance of rows ``x`` with
    multiplicities ``w`` > 0, and of the same with the ``drop`` largest-variance coordinates
    removed (:func:`collapse_core.metrics.rogue_dimensions`), via the n × n Gram matrix."""
    total = w.sum()
    mean = (w @ x) / total
    xc = (x - mean) * np.sqrt(w)[:, None] / np.sqrt(max(total - 1.0, 1.0))
    gram = xc @ xc.T
    var = np.einsum("ij,ij->j", xc, xc)
    rogue = np.argsort(-var, kind="stable")[:drop]
    gram_r = gram - xc[:, rogue] @ xc[:, rogue].T
    d = x.shape[1]
    out = []
    for g, dim in ((gram, d), (gram_r, d - drop)):
        lam = np.clip(np.linalg.eigvalsh((g + g.T) / 2)[::-1], 0.0, None)
        out.append(np.concatenate([lam, np.zeros(max(0, dim - lam.size))])[:dim])
    return out[0], out[1]


def _pair_cosine(x: np.ndarray, w: np.ndarray) -> float:
    """Mean cosine over pairs of distinct rows, rows counted ``w`` times (self-pairs excluded)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    unit = x / np.where(norms > 0, norms, 1.0)
    s = w @ unit
    den = w.sum() ** 2 - np.sum(w**2)
    return float((s @ s - np.sum(w**2)) / den) if den > 0 else float("nan")


def _twonn_weighted(dist: np.ndarray, w: np.ndarray, discard_fraction: float = 0.1) -> float:
    """TwoNN "fit" estimate (as :func:`collapse_core.metrics.twonn_dimension`) on the rows with
    w > 0 of a pairwise distance matrix (diagonal = inf), each μ repeated w times."""
    present = np.flatnonzero(w > 0)
    if present.size < 3:
        return float("nan")
    sub = dist[np.ix_(present, present)]
    r = np.partition(sub, 1, axis=1)[:, :2]
    keep = r[:, 0] > 0
    if keep.sum() < 2:
        return float("nan")
    log_mu = np.repeat(np.log(r[keep, 1] / r[keep, 0]), w[present][keep].astype(int))
    log_mu.sort()
    n = log_mu.size
    n_keep = min(int(np.floor(n * (1.0 - discard_fraction))), n - 1)
    xs = log_mu[:n_keep]
    ys = -np.log1p(-np.arange(1, n_keep + 1) / n)
    den = xs @ xs
    return float(xs @ ys / den) if den > 0 else float("nan")


def _distances(x: np.ndarray) -> np.ndarray:
    """Pairwise Euclidean distances (float64, diagonal inf; identical rows exactly 0)."""
    x64 = x.astype(np.float64)
    sq = np.einsum("ij,ij->i", x64, x64)
    dist = np.sqrt(np.clip(sq[:, None] + sq[None, :] - 2.0 * (x64 @ x64.T), 0.0, None))
    _, inverse = np.unique(x, axis=0, return_inverse=True)
    dist[inverse[:, None] == inverse[None, :]] = 0.0
    np.fill_diagonal(dist, np.inf)
    return dist


def subsample_metrics(
    x: np.ndarray, w: np.ndarray, dist: np.ndarray | None = None,
    token_values: dict[str, np.ndarray] | None = None,
) -> dict[str, float]:  # fmt: skip
    """Every :data:`CI_METRICS` metric of the subsample ``x`` (n × d) with multiplicities ``w``;
    ``token_values`` (metric → one value per row, NaN where a token has none, as off the
    logit lens's tokens) adds their weighted means Σ wᵢvᵢ / Σ wᵢ over the rows with a value;
    a 2 × rows entry (the lens's exact values and proxy) its two-phase estimate
    (:func:`collapse_core.lens.lens_estimate`)."""
    present = w > 0
    xp, wp = x[present], w[present].astype(np.float64)
    eig, eig_r = _weighted_spectrum(xp, wp, M.ROGUE_K)
    alpha, _ = M.alpha_req_from_eigenvalues(eig)
    centred = xp - (wp @ xp) / wp.sum()
    out = {
        "effective_rank": M.effective_rank_from_eigenvalues(eig),
        "stable_rank": M.stable_rank_from_eigenvalues(eig),
        "participation_ratio": M.participation_ratio_from_eigenvalues(eig),
        "top_pc_share": M.top_pc_share_from_eigenvalues(eig),
        "alpha_req": alpha,
        "anisotropy_cosine": _pair_cosine(xp, wp),
        "effective_rank_robust": M.effective_rank_from_eigenvalues(eig_r),
        "stable_rank_robust": M.stable_rank_from_eigenvalues(eig_r),
        "participation_ratio_robust": M.participation_ratio_from_eigenvalues(eig_r),
        "top_pc_share_robust": M.top_pc_share_from_eigenvalues(eig_r),
        "anisotropy_centred": _pair_cosine(centred, wp),
    }
    if dist is not None:
        out["twonn_dimension"] = _twonn_weighted(dist, w)
    for metric, values in (token_values or {}).items():
        if values.ndim == 2:  # (exact, proxy) rows of the two-phase logit lens
            out[metric] = lens_estimate(values[0], values[1], w)
            continue
        has = present & np.isfinite(values)
        total = w[has].sum()
        out[metric] = float(np.dot(w[has], values[has]) / total) if total > 0 else float("nan")
    return out


def basic_interval(
    estimate: float, replicates: np.ndarray, level: float = LEVEL
) -> tuple[float, float]:
    """Basic bootstrap interval (Davison & Hinkley 1997, eq. 5.6) of an estimate computed on
    the resampled data itself: [θ̂ − (q_hi − θ̂), θ̂ + (θ̂ − q_lo)], q the ``level`` tails."""
    tail = (1 - level) / 2 * 100
    q_lo, q_hi = np.percentile(replicates, [tail, 100 - tail])
    return float(2 * estimate - q_hi), float(2 * estimate - q_lo)


def spread_interval(
    centre: float, replicates: np.ndarray, level: float = LEVEL
) -> tuple[float, float]:
    """The replicates' percentile spread around ``centre``: [c − (q₅₀ − q_lo), c + (q_hi − q₅₀)]
    with q the ``level`` tails and median of the finite replicates (module docstring: the
    percentile interval with the bootstrap's location shift removed, so it always holds c)."""
    tail = (1 - level) / 2 * 100
    q_lo, q_mid, q_hi = np.percentile(replicates, [tail, 50.0, 100 - tail])
    return float(centre - (q_mid - q_lo)), float(centre + (q_hi - q_mid))


def prompt_bootstrap(
    x: np.ndarray, prompt_ids: Sequence[int], stored: dict[str, float] | None = None,
    n_boot: int = N_BOOT, seed: int = 0, level: float = LEVEL,
    keep: dict[str, tuple[float, np.ndarray]] | None = None,
    token_values: dict[str, np.ndarray] | None = None,
) -> pd.DataFrame:  # fmt: skip
    """CIs of one layer's metrics from resampling prompts (module docstring): rows metric, lo,
    hi, method. ``stored`` (metric → stored value) centres the basic intervals of the
    all-token metrics; metrics without a stored value get none. ``keep``, if given, receives
    metric → (θ̂_s, the B replicate values θ̂*_k). ``token_values`` (metric → one value per
    row of ``x``, e.g. the next-token entropy) are bootstrapped as weighted means."""
    from threadpoolctl import threadpool_limits

    # Small matrices: one BLAS thread is faster than several fighting over the cores.
    with threadpool_limits(1):
        return _prompt_bootstrap(
            x, prompt_ids, stored or {}, n_boot, seed, level, keep, token_values
        )


def prompt_draws(n_prompts: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """The ``n_boot`` draws of a prompt bootstrap (Efron & Tibshirani 1993, §6; prompts are
    the resampled units): each the multiplicity of every prompt in n_prompts draws with
    replacement. Equal arguments give equal draws, which pairs two probes' replicates."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield np.bincount(rng.integers(0, n_prompts, n_prompts), minlength=n_prompts)


def _prompt_bootstrap(
    x: np.ndarray, prompt_ids: Sequence[int], stored: dict[str, float], n_boot: int, seed: int,
    level: float, keep: dict[str, tuple[float, np.ndarray]] | None = None,
    token_values: dict[str, np.ndarray] | None = None,
) -> pd.DataFrame:  # fmt: skip
    x = np.asarray(x, dtype=np.float32)
    prompts = pd.factorize(pd.Series(list(prompt_ids)))[0]
    n_prompts = int(prompts.max()) + 1
    dist = _distances(x) if x.shape[0] >= 10 else None
    base = subsample_metrics(x, np.ones(x.shape[0]), dist, token_values)
    reps: dict[str, list[float]] = {m: [] for m in base}
    for counts in prompt_draws(n_prompts, n_boot, seed):
        for metric, value in subsample_metrics(x, counts[prompts], dist, token_values).items():
            reps[metric].append(value)
    if keep is not None:  # the replicates, for paired stage-to-stage differences
        keep.update({m: (base[m], np.asarray(v, dtype=np.float64)) for m, v in reps.items()})
    rows = []
    for metric, values in reps.items():
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        if v.size < n_boot // 2 or not np.isfinite(base[metric]):
            continue
        if CI_METRICS[metric]:
            lo, hi = basic_interval(base[metric], v, level)
            rows.append((metric, lo, hi, METHOD_SUBSAMPLE))
        elif metric in stored and np.isfinite(stored[metric]):
            lo, hi = spread_interval(stored[metric], v, level)
            rows.append((metric, lo, hi, METHOD_SHIFTED))
    return pd.DataFrame(rows, columns=["metric", "lo", "hi", "method"])


def bootstrap_replicates(
    x: np.ndarray, prompt_ids: Sequence[int], n_boot: int = N_BOOT, seed: int = 0
) -> dict[str, tuple[float, np.ndarray]]:
    """The replicates behind :func:`prompt_bootstrap`: metric → (θ̂_s, the B replicate values
    θ̂*_k). Two calls with equal prompt ids, ``n_boot`` and ``seed`` draw the same prompts in
    replicate k, i.e. are paired (:func:`paired_change_ci`)."""
    kept: dict[str, tuple[float, np.ndarray]] = {}
    prompt_bootstrap(x, prompt_ids, n_boot=n_boot, seed=seed, keep=kept)
    return kept


CI_COLUMNS = ["probe_key", "layer", "metric", "lo", "hi", "method", "n_boot", "n_prompts"]
BOOT_COLUMNS = ["probe_key", "layer", "metric", "subsample_value", "pairing", "n_boot",
                "replicates"]  # fmt: skip


def pairing_signature(samples: pd.DataFrame, n_boot: int, seed: int) -> str:
    """What makes two probes' replicates *paired*: the same subsample tokens (prompt, position,
    token id, in sample order) resampled with the same seed and replicate count, so replicate k
    draws the same prompts in both. A hash of those; equal hashes ⇒ replicate-wise differences
    are a paired bootstrap of the difference."""
    import hashlib

    cols = [c for c in ("prompt_idx", "position", "token_id") if c in samples]
    h = hashlib.sha256(f"{n_boot}:{seed}:{','.join(cols)}".encode())
    for col in cols:
        h.update(np.ascontiguousarray(samples[col].to_numpy(dtype=np.int64)).tobytes())
    return h.hexdigest()[:24]


def probe_bootstrap(
    store: Store, probe_key: str, n_boot: int = N_BOOT, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`prompt_bootstrap` at every layer of one stored probe.

    Returns (CIs: :data:`CI_COLUMNS`; replicates: :data:`BOOT_COLUMNS`, one row per (layer,
    metric) with the subsample estimate θ̂_s and the B replicate values θ̂*_k as float64 bytes),
    both empty when the probe kept no token vectors."""
    samples = store.query(
        "SELECT * FROM token_samples WHERE probe_key = ? ORDER BY sample_idx", [probe_key]
    )
    columns = store.columns("token_vectors")
    lens_column = "".join(f", {c}" for c in ("lens_entropy", "lens_proxy") if c in columns)
    vectors = store.query(
        f"SELECT layer, n, d, data{lens_column} FROM token_vectors WHERE probe_key = ? "
        "ORDER BY layer",
        [probe_key],
    )
    metrics = store.query(
        "SELECT layer, metric, value FROM layer_metrics WHERE probe_key = ?", [probe_key]
    )
    if samples.empty or vectors.empty:
        return pd.DataFrame(columns=CI_COLUMNS), pd.DataFrame(columns=BOOT_COLUMNS)
    prompts = samples["prompt_idx"].to_numpy()
    pairing = pairing_signature(samples, n_boot, seed)
    frames, boots = [], []
    for row in vectors.itertuples():
        x = decode_vectors(bytes(row.data), int(row.n), int(row.d))
        if x.shape[0] != prompts.size:
            continue
        here = metrics[metrics["layer"] == row.layer]
        stored = dict(zip(here["metric"], here["value"], strict=True))
        kept: dict[str, tuple[float, np.ndarray]] = {}
        ci = prompt_bootstrap(
            x, prompts, stored, n_boot, seed, keep=kept,
            token_values=_token_values(samples, stored, getattr(row, "lens_entropy", None),
                                       getattr(row, "lens_proxy", None)),
        )  # fmt: skip
        frames.append(ci.assign(layer=int(row.layer)))
        boots += [(probe_key, int(row.layer), m, float(v), pairing, n_boot, r.tobytes())
                  for m, (v, r) in kept.items()]  # fmt: skip
    if not frames:
        return pd.DataFrame(columns=CI_COLUMNS), pd.DataFrame(columns=BOOT_COLUMNS)
    out = pd.concat(frames, ignore_index=True)
    out = out.assign(probe_key=probe_key, n_boot=n_boot,
                     n_prompts=int(np.unique(prompts).size))[CI_COLUMNS]  # fmt: skip
    return out, pd.DataFrame(boots, columns=BOOT_COLUMNS)


def _token_values(
    samples: pd.DataFrame, stored: dict[str, float], lens_entropy: object = None,
    lens_proxy: object = None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """The per-token values behind the per-token metrics this layer stores: the
    :data:`TOKEN_MEAN_METRICS` (only the last layer stores them) when every subsample token has
    one, and the logit-lens entropy from the layer's ``lens_entropy`` bytes, stacked with its
    ``lens_proxy`` bytes where the layer has proxy values (a two-phase estimate)."""
    out = {}
    for metric in TOKEN_MEAN_METRICS:
        if metric in stored and metric in samples and samples[metric].notna().all():
            out[metric] = samples[metric].to_numpy(dtype=np.float64)
    if "logit_lens_entropy" in stored and isinstance(lens_entropy, bytes | bytearray | memoryview):
        values = np.frombuffer(bytes(lens_entropy), dtype=np.float64)
        if values.size == len(samples) and np.isfinite(values).any():
            out["logit_lens_entropy"] = values
            if isinstance(lens_proxy, bytes | bytearray | memoryview):
                proxy = np.frombuffer(bytes(lens_proxy), dtype=np.float64)
                if proxy.size == values.size and np.isfinite(proxy).any():
                    out["logit_lens_entropy"] = np.stack([values, proxy])
    return out


def probe_cis(store: Store, probe_key: str, n_boot: int = N_BOOT, seed: int = 0) -> pd.DataFrame:
    """The CIs of :func:`probe_bootstrap` (rows probe_key, layer, metric, lo, hi, method,
    n_boot, n_prompts)."""
    return probe_bootstrap(store, probe_key, n_boot, seed)[0]


def store_cis(store: Store, probe_keys: Sequence[str], n_boot: int = N_BOOT, log=None) -> int:
    """Compute and store :func:`probe_bootstrap` (``layer_metric_ci`` + ``layer_metric_boot``)
    for the probes that lack either or hold another replicate count or interval method (each
    probe in its own transaction): the paired stage-to-stage CIs match replicate k of two
    probes, so every probe of a comparison needs the same ``n_boot``; CIs of all-token metrics
    stored with the earlier basic interval are recomputed. Returns how many probes were computed."""
    keys = list(dict.fromkeys(probe_keys))
    if not keys:
        return 0
    marks = _marks(keys)
    done = set(store.query(
        f"SELECT DISTINCT c.probe_key FROM layer_metric_ci c JOIN layer_metric_boot b "
        f"USING (probe_key) WHERE c.probe_key IN ({marks}) AND c.n_boot = ? AND b.n_boot = ? "
        f"AND NOT EXISTS (SELECT 1 FROM layer_metric_ci x WHERE x.probe_key = c.probe_key "
        f"AND x.method NOT IN (?, ?))",
        [*keys, n_boot, n_boot, METHOD_SUBSAMPLE, METHOD_SHIFTED],
    )["probe_key"])  # fmt: skip
    todo = [k for k in keys if k not in done]
    for i, key in enumerate(todo):
        ci, boot = probe_bootstrap(store, key, n_boot)
        with store.transaction() as con:
            for table, frame in (("layer_metric_ci", ci), ("layer_metric_boot", boot)):
                con.execute(f"DELETE FROM {table} WHERE probe_key = ?", [key])
                store.insert_df(con, table, frame)
        if log is not None:
            log(f"prompt-bootstrap CIs {i + 1}/{len(todo)} (probe {key})")
    return len(todo)


def paired_change_ci(
    value_a: float, value_b: float, sub_a: float, sub_b: float, reps_a: np.ndarray,
    reps_b: np.ndarray, from_subsample: bool, level: float = LEVEL,
) -> tuple[float, float, float]:  # fmt: skip
    """Paired prompt-bootstrap CI of a stage-to-stage change Δ = θ_b − θ_a (Davison & Hinkley
    1997, §3.8 with the prompts as the shared top-level units): replicate k of both probes drew
    the same prompts, so Δ*_k = θ*_b,k − θ*_a,k resamples the *difference* and the prompt
    effect common to both stages cancels. As for one probe (module docstring): for metrics
    computed on the subsample itself the basic interval of Δ = Δ_s, the subsample difference;
    for all-token metrics :func:`spread_interval` of the Δ* around Δ, the stored-value
    difference. Returns (Δ, lo, hi); NaNs when fewer than half the replicates are finite."""
    d_star = np.asarray(reps_b, dtype=float) - np.asarray(reps_a, dtype=float)
    ok = np.isfinite(d_star)
    d_s = sub_b - sub_a
    diff = d_s if from_subsample else value_b - value_a
    if ok.sum() < max(2, d_star.size // 2) or not np.isfinite([diff, d_s]).all():
        return float(diff), float("nan"), float("nan")
    if from_subsample:
        lo, hi = basic_interval(d_s, d_star[ok], level)
    else:
        lo, hi = spread_interval(diff, d_star[ok], level)
    return float(diff), lo, hi


def stage_change_cis(
    store: Store, pairs: Sequence[tuple[str, str]], metrics: Sequence[str]
) -> pd.DataFrame:
    """:func:`paired_change_ci` for each (probe a, probe b) pair, layer and metric whose stored
    replicates are paired (equal :func:`pairing_signature`): rows probe_key_a, probe_key_b,
    layer, metric, diff, lo, hi. Pairs without paired replicates are absent."""
    cols = ["probe_key_a", "probe_key_b", "layer", "metric", "diff", "lo", "hi"]
    pairs, names = [(a, b) for a, b in dict.fromkeys(pairs) if a != b], list(metrics)
    if not pairs or not names or not store.columns("layer_metric_boot"):
        return pd.DataFrame(columns=cols)
    keys = sorted({k for pair in pairs for k in pair})
    boot = store.query(
        f"SELECT b.probe_key, b.layer, b.metric, b.subsample_value, b.pairing, b.replicates, "
        f"m.value FROM layer_metric_boot b JOIN layer_metrics m USING (probe_key, layer, metric) "
        f"WHERE b.probe_key IN ({_marks(keys)}) AND b.metric IN ({_marks(names)})",
        keys + names,
    )
    if boot.empty:
        return pd.DataFrame(columns=cols)
    by_key = {k: g.set_index(["layer", "metric"]) for k, g in boot.groupby("probe_key")}
    rows = []
    for a, b in pairs:
        if a not in by_key or b not in by_key:
            continue
        both = by_key[a].merge(by_key[b], left_index=True, right_index=True, suffixes=("_a", "_b"))
        for (layer, metric), r in both[both["pairing_a"] == both["pairing_b"]].iterrows():
            diff, lo, hi = paired_change_ci(
                r["value_a"], r["value_b"], r["subsample_value_a"], r["subsample_value_b"],
                np.frombuffer(bytes(r["replicates_a"]), dtype=np.float64),
                np.frombuffer(bytes(r["replicates_b"]), dtype=np.float64),
                CI_METRICS.get(metric, False),
            )  # fmt: skip
            rows.append((a, b, int(layer), metric, diff, lo, hi))
    return pd.DataFrame(rows, columns=cols)


def layer_cis(store: Store, probe_keys: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame:
    """Stored CIs: probe_key, layer, metric, lo, hi, method for the given probes and metrics."""
    keys, names = list(probe_keys), list(metrics)
    if not keys or not names:
        return pd.DataFrame(columns=["probe_key", "layer", "metric", "lo", "hi", "method"])
    return store.query(
        f"SELECT probe_key, layer, metric, lo, hi, method FROM layer_metric_ci WHERE probe_key "
        f"IN ({_marks(keys)}) AND metric IN ({_marks(names)})",
        keys + names,
    )


def exceeds_noise(
    value_a: float, lo_a: float, hi_a: float, value_b: float, lo_b: float, hi_b: float,
    z: float = 1.96,
) -> bool:  # fmt: skip
    """Whether |b − a| exceeds the combined prompt-sampling noise: |b − a| > z·√(se_a² + se_b²)
    with se = (hi − lo) / (2 · 1.96) from each 95 % CI. False when either CI is missing."""
    se_a, se_b = (hi_a - lo_a) / (2 * 1.96), (hi_b - lo_b) / (2 * 1.96)
    if not all(np.isfinite([value_a, value_b, se_a, se_b])):
        return False
    return bool(abs(value_b - value_a) > z * np.hypot(se_a, se_b))
