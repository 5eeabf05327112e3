"""A small but real database for report/page tests: one study of two runs × three stages built
from tiny random models (real probes, synthetic stage/eval rows), plus one standalone checkpoint.

``make_study_db(path, model_root)`` takes ~3-5 s on 2 CPU cores and returns a dict of ids;
``cached_study_db()`` builds it once per test process (tests copy the file before using it).
"""

from __future__ import annotations

import atexit
import datetime as dt
import functools
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from collapse_core.models import load_model
from collapse_core.probing import ProbeConfig, probe
from collapse_core.store import Store
from tiny_models import make_tiny_model

STUDY_ID = "study-test0001"
STUDY_NAME = "tiny <b>study</b>"
# With a byte-level vocab and few prompts, "general" can give TwoNN = NaN at the embedding layer
# (repeated tokens), which probe() refuses to store; math/refusal are stable for these seeds.
CONFIG = ProbeConfig(max_length=24, n_samples=64, batch_size=16, max_prompts=12)


def make_study_db(db_path: Path, model_root: Path) -> dict:
    """Build the database at ``db_path`` (tiny models saved under ``model_root``)."""
    store = Store(db_path)
    now = dt.datetime.now()
    loaded = []
    for seed in range(4):
        folder = model_root / f"tiny-{seed}"
        if not (folder / "config.json").exists():
            make_tiny_model("llama", path=folder, seed=seed)
        loaded.append(load_model(folder, device="cpu", verbose=False))
    base, sft_a, sft_b, standalone = loaded
    runs = {"run-a": ("baseline", [base, sft_a]), "run-b": ("replay", [base, sft_b])}
    with store.transaction() as con:
        con.execute("INSERT INTO studies VALUES (?, ?, '{}', ?)", [STUDY_ID, STUDY_NAME, now])
        for run_id, (arm, _) in runs.items():
            con.execute(
                "INSERT INTO runs (run_id, study_id, name, arm, seed, stage_order, config_json, "
                "status, created_at, finished_at, method) "
                "VALUES (?, ?, ?, ?, 0, 'sft', '{}', 'done', ?, ?, 'lora')",
                [run_id, STUDY_ID, f"tiny · sft · seed 0 · {arm}", arm, now, now],
            )
    evals, bins, generations = [], [], []
    for run_id, (_, models) in runs.items():
        for index, model in enumerate(models):
            stage = "base" if index == 0 else "sft"
            extra = {"run_id": run_id, "stage": stage, "stage_index": index}
            for probe_set in ("math", "refusal"):  # not "general": see below
                probe(model, probe_set, CONFIG, store=store, checkpoint_extra=extra)
            store.execute(
                "INSERT INTO stages (run_id, stage_index, stage, checkpoint_id, adapter_path, "
                "steps, train_loss_first, train_loss_last, seconds, created_at, method) "
                "VALUES (?, ?, ?, ?, NULL, 3, 2.0, 1.5, 1.0, ?, ?)",
                [run_id, index, stage, model.checkpoint_id, now, "lora" if index else None],
            )
            for metric, value in (("accuracy", 0.4 + 0.1 * index), ("ece", 0.1), ("nll", 1.2)):
                evals.append(
                    (run_id, model.checkpoint_id, f"{index}:{stage}", "ood", metric, value)
                )
            if run_id == "run-a":  # sandboxed code-generation samples of one run
                for task, status in (("HumanEval/1", "passed"), ("HumanEval/2", "failed")):
                    program = f"def task_{task[-1]}_stage_{index}():\n    return {index}\n"
                    generations.append((model.checkpoint_id, "code_pass_at_1", task, status,
                                        "prompt", "response", program))  # fmt: skip
            for b in range(3):
                bins.append((model.checkpoint_id, "ood", b, b / 3, (b + 1) / 3, 5,
                             (b + 0.5) / 3, 0.3 + 0.2 * b))  # fmt: skip
    with store.transaction() as con:
        store.insert_df(con, "evals", pd.DataFrame(
            evals, columns=["run_id", "checkpoint_id", "stage", "eval", "metric", "value"]
        ))  # fmt: skip
        store.insert_df(con, "calibration_bins", pd.DataFrame(bins, columns=[
            "checkpoint_id", "eval", "bin", "lower", "upper", "count", "mean_confidence",
            "accuracy",
        ]).drop_duplicates(["checkpoint_id", "bin"]))  # fmt: skip
    with store.transaction() as con:
        store.insert_df(con, "generations", pd.DataFrame(generations, columns=[
            "checkpoint_id", "eval", "item_id", "status", "prompt", "response", "program",
        ]))  # fmt: skip
    probe(standalone, "math", CONFIG, store=store)
    return {
        "study_id": STUDY_ID,
        "study_checkpoints": sorted(
            {base.checkpoint_id, sft_a.checkpoint_id, sft_b.checkpoint_id}
        ),  # fmt: skip
        "standalone": standalone.checkpoint_id,
        "db": db_path,
    }


@functools.cache
def cached_study_db() -> dict:
    """:func:`make_study_db` once per process, in a temp dir removed at exit. Copy ``db``
    before writing to it."""
    root = Path(tempfile.mkdtemp(prefix="collapse-study-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    return make_study_db(root / "study.duckdb", root / "models")
