"""Dashboard benchmark: how long each page takes to render on a realistically sized database.

``bench_app(args)`` builds (or reuses) a fixture database the size of a real SmolLM2 study —
7 checkpoints (base + 6 stages) × 31 layers × 4 probe sets, 576-dimensional spectra, 512 token
samples per probe, evals, calibration bins, LoRA metrics and one cached token map — with
synthetic but schema-valid rows written through the Store API (no model is loaded), then renders
every page with ``streamlit.testing.v1.AppTest`` and prints the seconds per page (first render,
which includes imports, and the best of the repeats).

Arguments (attributes of ``args``, all optional): ``db`` (path; reused when it exists unless
``rebuild``), ``rebuild`` (bool), ``repeat`` (int, default 3).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from .. import names
from ..paths import REPO_ROOT
from ..store import Store, encode_vectors

STAGES = ("base", *names.STAGES)
PROBE_SETS = ("general", "math", "code", "refusal")
N_LAYERS = 31
D_MODEL = 576
N_SAMPLES = 512
VECTOR_LAYERS = (0, 15, 30)  # token vectors are stored for these layers only (size)
RUN_ID = "run-bench-baseline"
STUDY_ID = "study-bench"
PAGES = ("overview", "spectra", "stages", "trajectories", "calibration", "lora", "hypothesis")
MODULES = [f"model.layers.{i}.self_attn.{m}" for i in range(30) for m in ("q_proj", "v_proj")]


def _spectrum(rng: np.random.Generator, alpha: float) -> np.ndarray:
    idx = np.arange(1, D_MODEL + 1, dtype=float)
    lam = idx**-alpha * np.exp(0.05 * rng.standard_normal(D_MODEL))
    return np.sort(lam)[::-1] * 10.0


def _probe_frames(
    rng: np.random.Generator, key: str, ckpt: str, pset: str, stage_index: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    from ..metrics import (
        alpha_req_from_eigenvalues,
        effective_rank_from_eigenvalues,
        participation_ratio_from_eigenvalues,
        stable_rank_from_eigenvalues,
        top_pc_share_from_eigenvalues,
    )

    lm_rows, spec_rows = [], []
    for layer in range(N_LAYERS):
        alpha = 0.7 + 0.02 * layer + 0.05 * stage_index + 0.02 * rng.standard_normal()
        lam = _spectrum(rng, alpha)
        a, r2 = alpha_req_from_eigenvalues(lam)
        aniso = min(0.95, 0.05 + 0.015 * layer + 0.03 * stage_index + 0.01 * rng.random())
        values = {
            "effective_rank": effective_rank_from_eigenvalues(lam),
            "stable_rank": stable_rank_from_eigenvalues(lam),
            "participation_ratio": participation_ratio_from_eigenvalues(lam),
            "alpha_req": a, "alpha_req_r2": r2,
            "top_pc_share": top_pc_share_from_eigenvalues(lam),
            "anisotropy_cosine": aniso,
            "within_prompt_cosine": aniso + 0.1, "between_prompt_cosine": aniso,
            "homogeneity_gap": 0.1, "mean_norm": 5.0 + layer,
            "twonn_dimension": 12.0 - 0.1 * layer - stage_index + rng.random(),
            "dormant_fraction": 0.01 * stage_index * rng.random(),
            "logit_lens_entropy": 8.0 - 0.2 * layer,
        }  # fmt: skip
        if layer == N_LAYERS - 1:
            values.update(next_token_entropy=3.0 - 0.1 * stage_index, top1_margin=0.3)
        lm_rows += [(key, ckpt, pset, layer, m, float(v)) for m, v in values.items()]
        spec_rows.append(pd.DataFrame({
            "probe_key": key, "checkpoint_id": ckpt, "probe_set": pset, "layer": layer,
            "idx": np.arange(1, D_MODEL + 1), "eigenvalue": lam,
        }))  # fmt: skip
    lm = pd.DataFrame(lm_rows, columns=["probe_key", "checkpoint_id", "probe_set", "layer",
                                        "metric", "value"])  # fmt: skip
    samples = pd.DataFrame({
        "probe_key": key, "sample_idx": np.arange(N_SAMPLES),
        "prompt_idx": np.arange(N_SAMPLES) // 8, "position": 1 + np.arange(N_SAMPLES) % 8,
        "token_id": np.arange(N_SAMPLES) % 300, "token": [f"tok{i % 300}" for i in range(N_SAMPLES)],
        "prompt": [f"{pset} prompt {i // 8}: some text of the probe" for i in range(N_SAMPLES)],
        "domain": [f"{pset}-{(i // 8) % 4}" for i in range(N_SAMPLES)],
    })  # fmt: skip
    vec_rng = np.random.default_rng(PROBE_SETS.index(pset))  # same tokens → related vectors
    base = vec_rng.standard_normal((N_SAMPLES, D_MODEL)).astype(np.float32)
    vectors = pd.DataFrame([{
        "probe_key": key, "layer": layer, "n": N_SAMPLES, "d": D_MODEL,
        "data": encode_vectors(base * (1 + 0.1 * layer) + 0.3 * stage_index
                               * rng.standard_normal((N_SAMPLES, D_MODEL))),
    } for layer in VECTOR_LAYERS])  # fmt: skip
    return lm, pd.concat(spec_rows, ignore_index=True), samples, vectors


def build_bench_db(path: str | Path, seed: int = 0) -> Store:
    """Write the benchmark database at ``path`` (replacing it); returns its Store."""
    from ..embeddings import EmbeddingSpec, compute_embedding

    path = Path(path)
    for p in (path, path.with_name(path.name + ".wal")):
        p.unlink(missing_ok=True)
    store = Store(path)
    rng = np.random.default_rng(seed)
    now = dt.datetime(2025, 1, 1, 9, 0)
    with store.transaction() as con:
        con.execute("INSERT INTO studies VALUES (?, 'bench study', '{}', ?)", [STUDY_ID, now])
        con.execute(
            "INSERT INTO runs (run_id, study_id, name, arm, seed, stage_order, config_json, "
            "status, created_at, finished_at, method) VALUES (?, ?, "
            "'bench · 6 stages · seed 0 · baseline', 'baseline', 0, ?, '{}', 'done', ?, ?, 'lora')",
            [RUN_ID, STUDY_ID, ",".join(STAGES[1:]), now, now + dt.timedelta(hours=3)],
        )
    evals, bins, stages = [], [], []
    for index, stage in enumerate(STAGES):
        ckpt = f"bench-ckpt-{index}"
        checkpoint = {
            "checkpoint_id": ckpt, "name": f"smollm2-bench-{stage}", "source": "bench",
            "kind": "hf", "architecture": "llama", "n_layers": 30, "d_model": D_MODEL,
            "n_params": 134_515_008, "run_id": RUN_ID, "stage": stage, "stage_index": index,
            "path": None, "created_at": now,
        }  # fmt: skip
        for pset in PROBE_SETS:
            key = f"bench-{index}-{pset}"
            probe = {
                "probe_key": key, "checkpoint_id": ckpt, "probe_set": pset,
                "probe_set_hash": "bench", "config_json": "{}", "code_version": "bench",
                "n_prompts": 64, "n_tokens": 3000, "n_layers": N_LAYERS, "device": "cpu",
                "seconds": 60.0, "created_at": now + dt.timedelta(minutes=index),
            }  # fmt: skip
            store.write_probe(checkpoint, probe, *_probe_frames(rng, key, ckpt, pset, index))
        finished = now + dt.timedelta(minutes=20 * index + 5)
        stages.append((RUN_ID, index, stage, ckpt, None, 24 * (index > 0), 2.0, 1.5,
                       900.0 * (index > 0), finished, "lora" if index else None))  # fmt: skip
        label = f"{index}:{stage}"
        for ev, metric, value in (
            ("ood", "accuracy", 0.5 - 0.03 * index), ("ood", "ece", 0.05 + 0.02 * index),
            ("ood", "mce", 0.2 + 0.03 * index), ("ood", "brier", 0.3 + 0.01 * index),
            ("ood", "nll", 1.2 + 0.05 * index), ("plasticity", "auc", 3.0 + 0.2 * index),
            ("plasticity", "final_loss", 1.4 + 0.05 * index),
            (stage, "heldout_loss", 2.0 - 0.1 * index),
        ):  # fmt: skip
            evals.append((RUN_ID, ckpt, label, ev, metric, value))
        for b in range(15):
            conf = (b + 0.5) / 15
            bins.append((ckpt, "ood", b, b / 15, (b + 1) / 15, 0 if b < 3 else 10,
                         conf if b >= 3 else 0.0, max(0.0, conf - 0.02 * index)))  # fmt: skip
    lora = []
    for index, stage in enumerate(STAGES[1:], start=1):
        label = f"{index}:{stage}"
        for module in MODULES:
            for metric, value in (("effective_rank", 5 + rng.random()), ("stable_rank", 2.0),
                                  ("update_rank", 8.0), ("relative_update_norm", 0.01),
                                  ("frobenius_norm", 0.3), ("spectral_norm", 0.2),
                                  ("intruder_dimensions", float(rng.integers(0, 3))),
                                  ("intruder_dimensions_cumulative", float(rng.integers(0, 5)))):  # fmt: skip
                lora.append((RUN_ID, label, module, metric, None, value))
            for j, earlier in enumerate(STAGES[1:index], start=1):
                other = f"{j}:{earlier}"
                lora += [(RUN_ID, label, module, "subspace_overlap", other, rng.random() * 0.3),
                         (RUN_ID, label, module, "principal_angle_mean", other, 1.2),
                         (RUN_ID, label, module, "principal_angle_min", other, 0.6)]  # fmt: skip
    frames = {
        "stages": pd.DataFrame(stages, columns=store.query("SELECT * FROM stages LIMIT 0").columns),
        "evals": pd.DataFrame(
            evals, columns=["run_id", "checkpoint_id", "stage", "eval", "metric", "value"]
        ),
        "calibration_bins": pd.DataFrame(
            bins, columns=store.query("SELECT * FROM calibration_bins LIMIT 0").columns
        ),
        "lora_metrics": pd.DataFrame(
            lora, columns=store.query("SELECT * FROM lora_metrics LIMIT 0").columns
        ),
    }
    with store.transaction() as con:
        for table, frame in frames.items():
            store.insert_df(con, table, frame)
    compute_embedding(store, EmbeddingSpec(mode="stages", probe_sets=("general",), run_id=RUN_ID,
                                           layer=15, method="pca"))  # fmt: skip
    return store


def _render(page: str, query: dict[str, str] | None = None) -> float:
    from streamlit.testing.v1 import AppTest

    start = time.perf_counter()
    at = AppTest.from_file(str(REPO_ROOT / "pages" / f"{page}.py"), default_timeout=300)
    for k, v in (query or {}).items():
        at.query_params[k] = v
    at.run()
    seconds = time.perf_counter() - start
    if at.exception:
        raise RuntimeError(f"page {page} raised: {at.exception[0].value}")
    return seconds


def bench_app(args: argparse.Namespace | None = None) -> dict[str, dict[str, float]]:
    """Build/reuse the benchmark DB, render each page, print and return per-page seconds."""
    db = getattr(args, "db", None)
    repeat = max(1, int(getattr(args, "repeat", None) or 3))
    tmp = None
    if db is None:
        tmp = tempfile.TemporaryDirectory(prefix="collapse-bench-app-")
        db = Path(tmp.name) / "bench_app.duckdb"
    db = Path(db)
    if getattr(args, "rebuild", False) or not db.exists():
        started = time.perf_counter()
        build_bench_db(db)
        print(f"built {db} ({db.stat().st_size / 1e6:.0f} MB: {len(STAGES)} checkpoints × "
              f"{N_LAYERS} layers × {len(PROBE_SETS)} probe sets) in "
              f"{time.perf_counter() - started:.1f} s")  # fmt: skip
    saved = {k: os.environ.get(k) for k in ("COLLAPSE_DB", "COLLAPSE_NO_AUTOPROBE")}
    os.environ["COLLAPSE_DB"] = str(db)
    os.environ["COLLAPSE_NO_AUTOPROBE"] = "1"
    results: dict[str, dict[str, float]] = {}
    cases = [(p, p, None) for p in PAGES] + [("trajectories (cached map)", "trajectories",
                                              {"method": "pca"})]  # fmt: skip
    try:
        print(f"{'page':<28}{'first s':>10}{'best s':>10}")
        for name, page, query in cases:
            times = [_render(page, query) for _ in range(repeat)]
            results[name] = {"first": times[0], "best": min(times)}
            print(f"{name:<28}{times[0]:>10.2f}{min(times):>10.2f}", flush=True)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if tmp is not None:
            tmp.cleanup()
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, default=None, help="benchmark DB (kept if given)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the DB even if it exists")
    parser.add_argument("--repeat", type=int, default=3, help="renders per page")
    bench_app(parser.parse_args())
