"""Shared pytest fixtures.

Databases for the dashboard tests (views, pages):

- ``observatory_db`` (session): a small but real database: one study of two runs (arms
  ``baseline`` and ``replay``) through stages base → sft → math of a tiny random llama (the
  stage weights are perturbed copies, with the token embedding squeezed a little more at every
  stage), REAL probes (``collapse_core.probing.probe``) on ``general`` and ``math``, plausible
  evals / calibration bins / generated-code samples / LoRA-update metrics written through the Store, one cached
  embedding per mode (fast ``pca`` method), plus one standalone probed checkpoint. Returns a
  dict of ids (see :func:`build_observatory_db`). Treat it as read-only; copy it
  (``observatory_db_copy``) to write.
- ``observatory_db_copy``: a per-test copy of that file.
- ``empty_db``: a per-test path to a fresh, empty database (schema only).
- ``app_env``: environment for AppTest runs: ``COLLAPSE_NO_AUTOPROBE=1``, not read-only, a temp
  ``COLLAPSE_DATA``, and ``worker.ensure_worker`` replaced by a recorder (``env["started"]``), so
  no worker process is ever spawned. Point ``COLLAPSE_DB`` yourself (``env["use"](path)``).
"""

from __future__ import annotations

import datetime as dt
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from collapse_core.eval_intervals import METHOD_WILSON, wilson_interval

# -- the dashboard fixture database --------------------------------------------------------
OBS_STUDY = "study-obs00001"
OBS_PROBE_SETS = ("general", "math")
OBS_STAGES = ("base", "sft", "math")
OBS_ARMS = {"run-obs-base": "baseline", "run-obs-replay": "replay"}


def _loaded(model: Any, tok: Any, checkpoint_id: str, name: str) -> Any:
    """Wrap an in-memory model as a LoadedModel (no save/load round trip)."""
    import torch

    from collapse_core.models import LoadedModel

    cfg = model.config
    return LoadedModel(
        model=model, tokenizer=tok, checkpoint_id=checkpoint_id, name=name, source="tests",
        kind="hf", architecture=str(cfg.model_type), n_layers=int(cfg.num_hidden_layers),
        d_model=int(cfg.hidden_size), n_params=sum(p.numel() for p in model.parameters()),
        device=torch.device("cpu"),
    )  # fmt: skip


def _stage_model(seed: int, stage_index: int, arm_seed: int) -> tuple[Any, Any]:
    """Tiny llama; every later stage adds noise and shrinks half the embedding directions."""
    import torch

    from tiny_models import make_tiny_model

    model, tok = make_tiny_model("llama", seed=seed)
    if stage_index:
        gen = torch.Generator().manual_seed(1000 * arm_seed + stage_index)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * stage_index * torch.randn(p.shape, generator=gen))
            emb = model.get_input_embeddings().weight
            d = emb.shape[1]
            scale = torch.ones(d)
            scale[d // 2 :] = 0.6**stage_index  # collapse: fewer directions carry variance
            emb.mul_(scale)
    return model, tok


OOD_ITEMS = 40


def _evals_for(run_id: str, ckpt: str, index: int, stage: str, arm: str) -> list[tuple]:
    rng = np.random.default_rng(zlib.crc32(f"{run_id}/{index}".encode()))
    bonus = 0.03 if arm != "baseline" else 0.0
    label = f"{index}:{stage}"
    rows = [
        ("ood", "accuracy", 0.55 - 0.06 * index + bonus + 0.01 * rng.standard_normal()),
        ("ood", "ece", 0.08 + 0.04 * index - bonus),
        ("ood", "mce", 0.2 + 0.05 * index),
        ("ood", "brier", 0.30 + 0.03 * index),
        ("ood", "nll", 1.1 + 0.1 * index),
        ("plasticity", "auc", 2.0 * (1 + 0.15 * index - bonus)),
        ("plasticity", "final_loss", 1.5 + 0.05 * index),
    ]
    for domain in ("sft", "math"):
        rows.append((domain, "heldout_loss", 2.0 - 0.3 * index + 0.05 * rng.standard_normal()))
    rows.append(("math", "answer_accuracy", 0.1 * index))
    out = [(run_id, ckpt, label, ev, m, float(v), None, None, None, None) for ev, m, v in rows]
    # OOD accuracy with n and the Wilson interval the pipeline stores (value kept unrounded:
    # other fixtures' expectations rest on it).
    lo, hi = wilson_interval(round(out[0][5] * OOD_ITEMS), OOD_ITEMS)
    out[0] = (*out[0][:6], OOD_ITEMS, lo, hi, METHOD_WILSON)
    return out


def _bins_for(ckpt: str, index: int) -> list[tuple]:
    rows = []
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        count = 0 if b < 4 else 3 + (b % 5)
        conf = (lo + hi) / 2
        acc = max(0.0, min(1.0, conf - 0.05 * index * conf))
        rows.append((ckpt, "ood", b, lo, hi, count, conf if count else 0.0, acc if count else 0.0))
    return rows


def _lora_rows(run_id: str, arm_seed: int) -> list[dict]:
    from collapse_core.train.lora_metrics import lora_update_metrics

    rng = np.random.default_rng(arm_seed)
    modules = [f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")]
    base = {m: rng.standard_normal((32, 32)) * 0.2 for m in modules}
    deltas: dict[str, dict[str, np.ndarray]] = {}
    shared = rng.standard_normal((32, 4))
    for index, stage in enumerate(OBS_STAGES[1:], start=1):
        deltas[f"{index}:{stage}"] = {
            m: (0.5 * shared + rng.standard_normal((32, 4))) @ rng.standard_normal((4, 32)) * 0.01
            for m in modules
        }
    rows = lora_update_metrics(deltas, base)
    return [{"run_id": run_id, **r} for r in rows]


def build_observatory_db(db_path: Path) -> dict[str, Any]:
    """Build the dashboard fixture database at ``db_path`` (~3-5 s on 2 CPU cores)."""
    from collapse_core.embeddings import EmbeddingSpec, compute_embedding
    from collapse_core.probing import ProbeConfig, probe
    from collapse_core.store import Store

    store = Store(db_path)
    config = ProbeConfig(max_length=32, n_samples=64, batch_size=24, max_prompts=24)
    now = dt.datetime(2025, 1, 1, 12, 0, 0)
    with store.transaction() as con:
        con.execute("INSERT INTO studies VALUES (?, 'obs study', '{}', ?)", [OBS_STUDY, now])
        for i, (run_id, arm) in enumerate(OBS_ARMS.items()):
            con.execute(
                "INSERT INTO runs (run_id, study_id, name, arm, seed, stage_order, config_json, "
                "status, created_at, finished_at, method) "
                "VALUES (?, ?, ?, ?, 0, 'sft,math', '{}', 'done', ?, ?, 'lora')",
                [run_id, OBS_STUDY, f"obs · sft→math · seed 0 · {arm}", arm,
                 now + dt.timedelta(minutes=i), now + dt.timedelta(minutes=30 + i)],
            )  # fmt: skip
    base_model, tok = _stage_model(0, 0, 0)
    base = _loaded(base_model, tok, "ckpt-base000000", "tiny-base")
    evals: list[tuple] = []
    bins: list[tuple] = []
    generations: list[tuple] = []
    lora: list[dict] = []
    ids: dict[str, list[str]] = {}
    for arm_seed, (run_id, arm) in enumerate(OBS_ARMS.items(), start=1):
        ids[run_id] = []
        for index, stage in enumerate(OBS_STAGES):
            if index == 0:
                loaded = base
            else:
                model, tok = _stage_model(0, index, arm_seed)
                loaded = _loaded(model, tok, f"ckpt-{arm[:4]}-{index}", f"tiny-{arm}-{stage}")
            extra = {"run_id": run_id, "stage": stage, "stage_index": index}
            for probe_set in OBS_PROBE_SETS:
                probe(loaded, probe_set, config, store=store, checkpoint_extra=extra)
            store.execute(
                "INSERT INTO stages (run_id, stage_index, stage, checkpoint_id, adapter_path, "
                "steps, train_loss_first, train_loss_last, seconds, created_at, method) "
                "VALUES (?, ?, ?, ?, NULL, ?, 2.0, 1.5, ?, ?, ?)",
                [run_id, index, stage, loaded.checkpoint_id, 3 * index, 60.0 * index,
                 now + dt.timedelta(minutes=5 * index + arm_seed), "lora" if index else None],
            )  # fmt: skip
            ids[run_id].append(loaded.checkpoint_id)
            evals += _evals_for(run_id, loaded.checkpoint_id, index, stage, arm)
            if index or arm_seed == 1:
                bins += _bins_for(loaded.checkpoint_id, index)
            if arm_seed == 1:  # sandboxed code-generation samples of the baseline run
                for task, status in (("HumanEval/1", "passed"), ("HumanEval/2", "failed")):
                    program = f"def task_{task[-1]}_stage_{index}():\n    return {index}\n"
                    generations.append((loaded.checkpoint_id, "code_pass_at_1", task, status,
                                        "prompt", "response", program))  # fmt: skip
        lora += _lora_rows(run_id, arm_seed)
    with store.transaction() as con:
        for table, rows in (("evals", evals), ("calibration_bins", bins),
                            ("generations", generations)):  # fmt: skip
            columns = con.execute(f"SELECT * FROM {table} LIMIT 0").df().columns
            store.insert_df(con, table, pd.DataFrame(rows, columns=columns))
        store.insert_df(con, "lora_metrics", pd.DataFrame(lora))
    model, tok = _stage_model(7, 0, 0)
    standalone = _loaded(model, tok, "ckpt-alone00000", "tiny-standalone")
    probe(standalone, "general", config, store=store)
    stage_spec = EmbeddingSpec(mode="stages", probe_sets=("general",), run_id="run-obs-base",
                               layer=1, method="pca")  # fmt: skip
    layer_spec = EmbeddingSpec(mode="layers", probe_sets=("general", "math"),
                               checkpoint_id=ids["run-obs-base"][-1], layers=(0, 1, 2),
                               method="pca")  # fmt: skip
    compute_embedding(store, stage_spec)
    compute_embedding(store, layer_spec)
    return {
        "db": db_path,
        "study_id": OBS_STUDY,
        "runs": list(OBS_ARMS),
        "checkpoints": ids,
        "standalone": standalone.checkpoint_id,
        "probe_sets": list(OBS_PROBE_SETS),
        "stage_embedding": stage_spec,
        "layer_embedding": layer_spec,
        "n_layers": 3,
    }


@pytest.fixture(scope="session")
def observatory_db(tmp_path_factory) -> dict[str, Any]:
    """The dashboard fixture database (session scope; do not write to it)."""
    root = tmp_path_factory.mktemp("observatory")
    return build_observatory_db(root / "observatory.duckdb")


@pytest.fixture
def observatory_db_copy(observatory_db, tmp_path) -> dict[str, Any]:
    """A writable per-test copy of ``observatory_db`` (same ids; ``db`` is the copy)."""
    path = tmp_path / "observatory-copy.duckdb"
    shutil.copy(observatory_db["db"], path)
    return {**observatory_db, "db": path}


@pytest.fixture
def empty_db(tmp_path) -> Path:
    """Path of a fresh database with the schema and no rows."""
    from collapse_core.store import Store

    path = tmp_path / "empty.duckdb"
    Store(path)
    return path


@pytest.fixture
def app_env(tmp_path, monkeypatch) -> dict[str, Any]:
    """Environment for AppTest page runs (see module docstring)."""
    from collapse_core.jobs import worker

    monkeypatch.setenv("COLLAPSE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("COLLAPSE_NO_AUTOPROBE", "1")
    monkeypatch.delenv("COLLAPSE_READONLY", raising=False)
    started: list[str] = []
    monkeypatch.setattr(worker, "ensure_worker", lambda store, *a, **k: started.append("w") or True)

    def use(path: Path) -> None:
        monkeypatch.setenv("COLLAPSE_DB", str(path))

    return {"started": started, "use": use, "tmp": tmp_path}
