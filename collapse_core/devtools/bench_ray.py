"""``python -m collapse_core bench ray``: one sweep, local executor vs Ray, wall time and sizes.

The sweep is ``configs/quick.toml`` cut to its first ``--stages`` stages × seeds 0, 1 × arms
baseline, replay (4 runs) on the tiny random model (or ``--model``). Each executor gets a fresh
data folder and DB. Ray runs on a local cluster with ``--workers`` CPUs (default 2), started
before the clock starts (its start-up time is printed separately). Reported: wall time of each,
the segments' size (Parquet + meta, without the merged checkpoints kept for resume), the DB
size after the driver's ingest, the time to ingest the whole folder into a fresh DB and to
ingest it again (a no-op), and the largest relative difference of any stored layer metric.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from ..paths import REPO_ROOT


def _config(model: str, stages: int):
    from ..runconfig import load_config, parse_config

    raw = load_config(REPO_ROOT / "configs" / "quick.toml").raw
    order = raw["run"]["stages"][:stages]
    raw["run"].update(stages=order, seeds=[0, 1], model=model)
    raw["interventions"] = {"arms": ["baseline", "replay"]}
    return parse_config(raw, where="bench ray")


def _segment_bytes(results: Path) -> int:
    from ..segments import find_segments

    return sum(p.stat().st_size for seg in find_segments(results) for p in seg.iterdir())


def _metrics(store) -> np.ndarray:
    return store.query(
        "SELECT m.value FROM layer_metrics m JOIN stages s USING (checkpoint_id) "
        "ORDER BY s.run_id, s.stage_index, m.layer, m.metric"
    )["value"].to_numpy(float)


def bench_ray(args: argparse.Namespace) -> int:
    """Run the sweep both ways and print the table described in the module docstring."""
    from ..distributed import import_ray, run_study_ray, start_local_cluster
    from ..pipeline import run_study
    from ..segments import ingest_folder
    from ..store import Store
    from ..tiny_models import make_tiny_model

    ray = import_ray()
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp_name:
        tmp = Path(tmp_name)
        model = args.model
        if model == "tiny":
            make_tiny_model("llama", path=tmp / "tiny", seed=0)
            model = str(tmp / "tiny")
        config = _config(model, args.stages)
        n_runs = len(config.seeds) * len(config.arms)
        os.environ["COLLAPSE_DATA"] = str(tmp / "local")
        local = Store(tmp / "local" / "local.duckdb")
        started = time.perf_counter()
        run_study(config, local)
        local_s = time.perf_counter() - started
        os.environ["COLLAPSE_DATA"] = str(tmp / "ray")
        started = time.perf_counter()
        start_local_cluster(num_cpus=args.workers)
        cluster_s = time.perf_counter() - started
        results = tmp / "ray" / "results"
        remote = Store(tmp / "ray" / "ray.duckdb")
        try:
            started = time.perf_counter()
            run_study_ray(_config(model, args.stages), remote, results)
            ray_s = time.perf_counter() - started
        finally:
            ray.shutdown()
        fresh = Store(tmp / "fresh.duckdb")
        started = time.perf_counter()
        report = ingest_folder(fresh, results)
        ingest_s = time.perf_counter() - started
        started = time.perf_counter()
        again = ingest_folder(fresh, results)
        again_s = time.perf_counter() - started
        a, b = _metrics(local), _metrics(remote)
        worst = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12))) if len(a) == len(b) else float("nan")  # fmt: skip
        print(f"\nbench ray: {n_runs} runs × {args.stages + 1} checkpoints ({model if args.model != 'tiny' else 'tiny model'}), "
              f"{os.cpu_count()} CPUs on this machine")  # fmt: skip
        print(f"local executor            {local_s:8.1f} s")
        print(f"ray, {args.workers} workers            {ray_s:8.1f} s   ({local_s / ray_s:.2f}x; "
              f"cluster start {cluster_s:.1f} s not included)")  # fmt: skip
        print(
            f"segments                  {report.applied} stages, {_segment_bytes(results) / 1e6:.2f} MB"
        )
        print(f"DB after driver ingest    {remote.path.stat().st_size / 1e6:.2f} MB "
              f"(local executor's DB {local.path.stat().st_size / 1e6:.2f} MB)")  # fmt: skip
        print(f"ingest into a fresh DB    {ingest_s:8.2f} s; again {again_s:.2f} s "
              f"({again.applied} applied, {again.skipped} already present)")  # fmt: skip
        print(
            f"layer metrics, local vs ray: {len(a)} vs {len(b)} values, worst relative difference {worst:.2e}"
        )
    return 0
