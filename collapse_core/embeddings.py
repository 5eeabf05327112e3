"""2-D maps of the stored token samples: how individual tokens move across stages and layers.

Two selections (an :class:`EmbeddingSpec`):

- ``mode="stages"``: one run, one layer; one *slice* per committed stage of the run, in stage
  order. The same tokens (matched by probe set, prompt and position) are embedded in every slice.
- ``mode="layers"``: one checkpoint; one slice per chosen layer.

Method (``method="aligned_umap"``, the default): each slice is centred and reduced to its first
50 principal components (PCA-50, by SVD), then ``umap.AlignedUMAP`` embeds all slices jointly with
the identity relation between consecutive slices (token i ↔ token i), so the slices share one
map and a token's path from slice to slice is meaningful. ``method="pca"`` is a fast linear
preview (per-slice PCA-2, signs and rotation aligned to the previous slice by orthogonal
Procrustes); it needs no numba compilation and is what the tests use.

UMAP is slow (import ~4 s, numba compilation ~20-30 s, AlignedUMAP over 7 × 1,500 tokens ~80 s on
2 CPU cores), so it never runs inside a page script: the page submits an ``embedding`` job
(:mod:`collapse_core.embedding_job`) and reads the cached result. Results live in the
``embeddings`` table keyed by :func:`embedding_key`, a hash of the resolved selection (the probe
keys of every slice, so a new probe gives a new key) and the method parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from . import catalog
from .errors import CollapseError
from .store import Store, decode_vectors, dumps

EMBEDDING_CODE_VERSION = "1"
METHODS = ("aligned_umap", "pca")
PCA_DIMS = 50

ProgressFn = Callable[[float, str], None]


@dataclass(frozen=True)
class EmbeddingSpec:
    """What to embed. ``stages`` mode uses run_id + layer; ``layers`` mode uses checkpoint_id +
    layers. ``max_tokens`` caps the tokens per slice (fixed-seed subsample)."""

    mode: str = "stages"
    probe_sets: tuple[str, ...] = ("general",)
    run_id: str | None = None
    layer: int | None = None
    checkpoint_id: str | None = None
    layers: tuple[int, ...] = ()
    method: str = "aligned_umap"
    n_neighbors: int = 15
    min_dist: float = 0.1
    max_tokens: int = 1500
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (for a job spec)."""
        d = asdict(self)
        d["probe_sets"] = list(self.probe_sets)
        d["layers"] = list(self.layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EmbeddingSpec:
        """Inverse of :meth:`to_dict` (unknown keys are ignored)."""
        names = set(cls.__dataclass_fields__)
        kw = {k: v for k, v in d.items() if k in names}
        kw["probe_sets"] = tuple(kw.get("probe_sets") or ("general",))
        kw["layers"] = tuple(int(x) for x in kw.get("layers") or ())
        if kw.get("layer") is not None:
            kw["layer"] = int(kw["layer"])
        return cls(**kw)


@dataclass
class Slice:
    """One panel of an embedding: a label and, per probe set, the probe key at ``layer``."""

    label: str
    layer: int
    probe_keys: dict[str, str] = field(default_factory=dict)
    stage_index: int | None = None


def resolve(store: Store, spec: EmbeddingSpec) -> list[Slice]:
    """The slices of a selection, in order; raises CollapseError when nothing matches."""
    if spec.method not in METHODS:
        raise CollapseError(f"unknown embedding method {spec.method!r}; use one of {METHODS}")
    if not spec.probe_sets:
        raise CollapseError("pick at least one probe set to embed")
    slices: list[Slice] = []
    if spec.mode == "stages":
        if not spec.run_id or spec.layer is None:
            raise CollapseError("an across-stages embedding needs a run and a layer")
        cat = catalog.stage_catalog(store, [spec.run_id])
        if cat.empty:
            raise CollapseError(f"run {spec.run_id} has no finished stages yet")
        probes = catalog.latest_probes(store, list(cat["checkpoint_id"]), spec.probe_sets)
        for row in cat.itertuples():
            mine = probes[probes["checkpoint_id"] == row.checkpoint_id]
            keys = dict(zip(mine["probe_set"], mine["probe_key"], strict=True))
            if all(p in keys for p in spec.probe_sets):
                slices.append(Slice(row.stage_label, int(spec.layer), keys, int(row.stage_index)))
    elif spec.mode == "layers":
        if not spec.checkpoint_id or not spec.layers:
            raise CollapseError("an across-layers embedding needs a checkpoint and layers")
        probes = catalog.latest_probes(store, [spec.checkpoint_id], spec.probe_sets)
        keys = dict(zip(probes["probe_set"], probes["probe_key"], strict=True))
        missing = [p for p in spec.probe_sets if p not in keys]
        if missing:
            raise CollapseError(
                f"checkpoint {spec.checkpoint_id[:12]} has no probe on {', '.join(missing)}"
            )
        slices = [Slice(f"L{layer}", int(layer), keys) for layer in sorted(set(spec.layers))]
    else:
        raise CollapseError(f"unknown embedding mode {spec.mode!r}; use 'stages' or 'layers'")
    if not slices:
        raise CollapseError("no stage of this run has probes on all chosen probe sets")
    return slices


def embedding_key(store: Store, spec: EmbeddingSpec) -> str:
    """Hash of the resolved selection (probe keys per slice) and the method parameters."""
    slices = resolve(store, spec)
    payload = {
        "version": EMBEDDING_CODE_VERSION,
        "mode": spec.mode,
        "slices": [(s.layer, sorted(s.probe_keys.items())) for s in slices],
        "method": spec.method,
        "n_neighbors": spec.n_neighbors,
        "min_dist": spec.min_dist,
        "max_tokens": spec.max_tokens,
        "seed": spec.seed,
    }
    return "emb-" + hashlib.sha256(dumps(payload).encode()).hexdigest()[:20]


def is_cached(store: Store, key: str) -> bool:
    """Whether coordinates for this key are stored."""
    df = store.query("SELECT 1 FROM embeddings WHERE embedding_key = ? LIMIT 1", [key])
    return not df.empty


def token_table(store: Store, slices: list[Slice], probe_sets: tuple[str, ...]) -> pd.DataFrame:
    """The tokens embedded in every slice: probe_set, prompt_idx, position, token, prompt,
    domain, and per slice i the column ``s{i}`` = that slice's sample_idx. Tokens are matched by
    (probe set, prompt, position) and kept only when every slice has them."""
    frames = []
    for pset in probe_sets:
        merged: pd.DataFrame | None = None
        for i, sl in enumerate(slices):
            df = store.query(
                "SELECT sample_idx, prompt_idx, position, token, prompt, domain "
                "FROM token_samples WHERE probe_key = ?",
                [sl.probe_keys[pset]],
            ).rename(columns={"sample_idx": f"s{i}"})
            if merged is None:
                merged = df
            else:
                merged = merged.merge(
                    df[["prompt_idx", "position", f"s{i}"]], on=["prompt_idx", "position"]
                )
        if merged is not None and not merged.empty:
            frames.append(merged.assign(probe_set=pset))
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True)


def _subsample(tokens: pd.DataFrame, max_tokens: int, seed: int) -> pd.DataFrame:
    if len(tokens) <= max_tokens:
        return tokens.reset_index(drop=True)
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.choice(len(tokens), size=max_tokens, replace=False))
    return tokens.iloc[keep].reset_index(drop=True)


def slice_vectors(store: Store, sl: Slice, tokens: pd.DataFrame, col: str) -> np.ndarray:
    """Hidden states of ``tokens`` in one slice (rows in ``tokens`` order), float32."""
    parts = []
    for pset, grp in tokens.groupby("probe_set", sort=False):
        df = store.query(
            "SELECT n, d, data FROM token_vectors WHERE probe_key = ? AND layer = ?",
            [sl.probe_keys[str(pset)], sl.layer],
        )
        if df.empty:
            raise CollapseError(
                f"no token vectors stored for {pset} at layer {sl.layer} ({sl.label})"
            )
        mat = decode_vectors(bytes(df["data"][0]), int(df["n"][0]), int(df["d"][0]))
        parts.append((grp.index.to_numpy(), mat[grp[col].to_numpy().astype(int)]))
    out = np.zeros((len(tokens), parts[0][1].shape[1]), dtype=np.float32)
    for rows, mat in parts:
        out[rows] = mat
    return out


def pca(x: np.ndarray, k: int = PCA_DIMS) -> np.ndarray:
    """Centre and project onto the top-k principal components (k clipped to the data)."""
    x = np.asarray(x, dtype=np.float64)
    xc = x - x.mean(axis=0, keepdims=True)
    k = max(1, min(k, xc.shape[0], xc.shape[1]))
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    return (u[:, :k] * s[:k]).astype(np.float32)


def _procrustes_align(prev: np.ndarray, cur: np.ndarray) -> np.ndarray:
    """Rotate/reflect ``cur`` (n×2) to best match ``prev`` (orthogonal Procrustes)."""
    u, _, vt = np.linalg.svd(cur.T @ prev)
    return cur @ (u @ vt)


def _fit_pca(data: list[np.ndarray], spec: EmbeddingSpec) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    for x in data:
        y = pca(x, 2)
        if y.shape[1] < 2:
            y = np.pad(y, ((0, 0), (0, 2 - y.shape[1])))
        y = y / (np.abs(y).max() or 1.0)
        if out:
            y = _procrustes_align(out[-1], y)
        out.append(y)
    return out


def _fit_umap(data: list[np.ndarray], spec: EmbeddingSpec) -> list[np.ndarray]:
    import warnings

    import umap  # heavy: only ever imported inside a worker

    n = min(x.shape[0] for x in data)
    neighbors = max(2, min(spec.n_neighbors, n - 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if len(data) == 1:
            reducer = umap.UMAP(n_neighbors=neighbors, min_dist=spec.min_dist,
                                random_state=spec.seed, n_jobs=1)  # fmt: skip
            return [reducer.fit_transform(data[0])]
        relations = [{i: i for i in range(x.shape[0])} for x in data[:-1]]
        aligned = umap.AlignedUMAP(n_neighbors=neighbors, min_dist=spec.min_dist,
                                   random_state=spec.seed)  # fmt: skip
        aligned.fit(data, relations=relations)
        return [np.asarray(e) for e in aligned.embeddings_]


def _with_ticker(fn: Callable[[], Any], expected_s: float, tick: Callable[[float], None]) -> Any:
    """Run ``fn()`` while a helper thread reports elapsed / expected time (capped at 0.95) every
    2 s: UMAP itself has no progress hook, and the job's ETA comes from these reports."""
    import threading
    import time

    done = threading.Event()

    def ticker() -> None:
        started = time.monotonic()
        while not done.wait(2.0):
            try:
                tick(min(0.95, (time.monotonic() - started) / max(expected_s, 1.0)))
            except Exception:  # progress is best effort; never kill the fit
                pass

    thread = threading.Thread(target=ticker, daemon=True)
    thread.start()
    try:
        return fn()
    finally:
        done.set()
        thread.join(timeout=5)


def compute_embedding(
    store: Store,
    spec: EmbeddingSpec,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> dict[str, Any]:
    """Compute and store the embedding of ``spec`` (all rows in one transaction).

    Returns {"embedding_key", "slices", "tokens", "cached"}; a stored key is a cache hit.
    """
    report = progress or (lambda f, m: None)
    key = embedding_key(store, spec)
    slices = resolve(store, spec)
    if is_cached(store, key):
        return {"embedding_key": key, "slices": len(slices), "tokens": None, "cached": True}
    report(0.05, "matching token samples")
    tokens = token_table(store, slices, spec.probe_sets)
    if tokens.empty or len(tokens) < 5:
        raise CollapseError("fewer than 5 tokens are shared by every slice; nothing to embed")
    tokens = _subsample(tokens, spec.max_tokens, spec.seed)
    data = []
    for i, sl in enumerate(slices):
        if should_stop is not None and should_stop():
            raise CollapseError("embedding cancelled; nothing was stored")
        report(0.05 + 0.15 * i / len(slices), f"PCA-{PCA_DIMS} of {sl.label}")
        data.append(pca(slice_vectors(store, sl, tokens, f"s{i}")))
    if should_stop is not None and should_stop():
        raise CollapseError("embedding cancelled; nothing was stored")
    label = f"{spec.method} on {len(slices)} × {len(tokens)} tokens"
    report(0.2, label)
    fit = _fit_pca if spec.method == "pca" else _fit_umap
    coords = _with_ticker(lambda: fit(data, spec), estimate_seconds(len(slices), len(tokens),
                          spec.method), lambda f: report(0.2 + 0.75 * f, label))  # fmt: skip
    report(0.95, "storing coordinates")
    rows = []
    for i, (sl, xy) in enumerate(zip(slices, coords, strict=True)):
        for pset, grp in tokens.groupby("probe_set", sort=False):
            idx = grp.index.to_numpy()
            rows.append(pd.DataFrame({
                "embedding_key": key, "probe_key": sl.probe_keys[str(pset)], "layer": sl.layer,
                "sample_idx": grp[f"s{i}"].to_numpy().astype(int),
                "x": xy[idx, 0].astype(float), "y": xy[idx, 1].astype(float),
            }))  # fmt: skip
    frame = pd.concat(rows, ignore_index=True)
    with store.transaction() as con:
        con.execute("DELETE FROM embeddings WHERE embedding_key = ?", [key])
        store.insert_df(con, "embeddings", frame)
    return {"embedding_key": key, "slices": len(slices), "tokens": len(tokens), "cached": False}


def load_embedding(store: Store, spec: EmbeddingSpec) -> pd.DataFrame:
    """Stored coordinates of ``spec`` with token context, one row per (slice, token):
    slice, slice_index, layer, probe_set, token_id (stable across slices: ``probe_set:prompt:
    position``), token, prompt, domain, position, x, y. Empty when not computed yet."""
    key = embedding_key(store, spec)
    slices = resolve(store, spec)
    coords = store.query(
        "SELECT probe_key, layer, sample_idx, x, y FROM embeddings WHERE embedding_key = ?", [key]
    )
    if coords.empty:
        return pd.DataFrame()
    keys = sorted({k for sl in slices for p, k in sl.probe_keys.items() if p in spec.probe_sets})
    # One query for every slice's token context (each query opens a connection; see store).
    all_meta = store.query(
        "SELECT probe_key, sample_idx, prompt_idx, position, token, prompt, domain "
        f"FROM token_samples WHERE probe_key IN ({', '.join('?' * len(keys))})",
        keys,
    ) if keys else pd.DataFrame(columns=["probe_key", "sample_idx"])  # fmt: skip
    meta_by_key = {k: g.drop(columns="probe_key") for k, g in all_meta.groupby("probe_key")}
    frames = []
    for i, sl in enumerate(slices):
        for pset, pkey in sl.probe_keys.items():
            if pset not in spec.probe_sets:
                continue
            mine = coords[(coords["probe_key"] == pkey) & (coords["layer"] == sl.layer)]
            if mine.empty or pkey not in meta_by_key:
                continue
            df = mine.merge(meta_by_key[pkey], on="sample_idx")
            df["slice"] = sl.label
            df["slice_index"] = i
            df["probe_set"] = pset
            frames.append(df)
    if not frames:
        return pd.DataFrame()
    out = pd.concat(frames, ignore_index=True)
    out["token_id"] = (
        out["probe_set"] + ":" + out["prompt_idx"].astype(str) + ":" + out["position"].astype(str)
    )
    cols = ["slice", "slice_index", "layer", "probe_set", "token_id", "token", "prompt",
            "domain", "position", "x", "y"]  # fmt: skip
    return out.sort_values(["slice_index", "token_id"])[cols].reset_index(drop=True)


def estimate_seconds(n_slices: int, n_tokens: int, method: str = "aligned_umap") -> float:
    """Rough wall time on 2 CPU cores: ~25 s numba compilation, then ~5.5 s per 1,000 points
    (DESIGN.md: AlignedUMAP over 7 × 1,500 tokens ≈ 80 s)."""
    if method == "pca":
        return 1.0 + 0.001 * n_slices * n_tokens
    return 25.0 + 5.5 * n_slices * n_tokens / 1000.0


def submit(store: Store, spec: EmbeddingSpec) -> str:
    """Queue an ``embedding`` job for ``spec`` unless one for the same key is queued or running;
    returns the job id (the caller starts a worker with ``jobs.worker.ensure_worker``)."""
    from .jobs import queue

    key = embedding_key(store, spec)
    job = queue.job_for_key(store, "embedding", "key", key)
    if job is not None and job["status"] in queue.ACTIVE:
        return str(job["job_id"])
    return queue.submit(store, "embedding", {"key": key, "spec": spec.to_dict()})


def default_layers(n_layers: int, max_layers: int = 8) -> list[int]:
    """Up to ``max_layers`` evenly spaced layers of 0..n_layers-1, always with the last."""
    if n_layers <= 0:
        return []
    if n_layers <= max_layers:
        return list(range(n_layers))
    picks = np.linspace(0, n_layers - 1, max_layers).round().astype(int)
    return sorted(set(int(p) for p in picks))
