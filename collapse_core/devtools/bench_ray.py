"""``python -m collapse_core bench ray``: one sweep, local executor vs Ray, wall time and sizes.

The sweep is ``configs/quick.toml`` cut to its first ``--stages`` stages × seeds 0, 1 × arms
baseline, replay (4 runs) on the tiny random model (or ``--model``). Each executor gets a fresh
data folder and DB. Ray runs on a local cluster with ``--workers`` CPUs (default 2), started
before the clock starts (its start-up time is printed separately). Reported: wall time of each,
the segments' size (Parquet + meta, without the merged checkpoints kept for resume), the DB
size after the driver's ingest, the time to ingest the whole folder into a fresh DB and to
ingest it again (a no-op), and the largest relative difference of any stored layer metric.
Then, on the same cluster, a 3-checkpoint tiny ``track`` and a 3-model tiny ``probe``, local
vs Ray (wall time, segment sizes, identical stored metrics or not).
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
            small = _track_and_probe(tmp / "small")
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
        worst = _worst_relative(a, b) if len(a) == len(b) else float("nan")
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
        for line in small:
            print(line)
    return 0


def _worst_relative(a: np.ndarray, b: np.ndarray) -> float:
    """max |a − b| / max(|a|, 1e-12) over paired values (0.0 when there are none)."""
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-12))) if len(a) else 0.0


def _track_and_probe(tmp: Path) -> list[str]:
    """Track a 3-checkpoint tiny series and probe 3 tiny models, local vs Ray (on the running
    cluster): wall times, segment sizes, whether the stored layer metrics are identical."""
    from ..distributed import probe_models_ray, track_ray
    from ..models import load_model
    from ..probing import ProbeConfig, probe
    from ..segments import find_segments, ingest_folder
    from ..store import Store
    from ..tiny_models import make_tiny_model
    from ..track import TrackSettings, series_entries, track

    paths = []
    for seed in range(3):
        make_tiny_model("llama", path=tmp / "series" / f"checkpoint-{seed + 1}", seed=seed)
        paths.append(str(tmp / "series" / f"checkpoint-{seed + 1}"))
    config = ProbeConfig(max_length=32, n_samples=128, max_prompts=32)
    settings = TrackSettings(probe_sets=("general", "math"), probe=config, device="cpu")
    entries = series_entries([tmp / "series"], None)
    lines = []
    for what in ("track", "probe"):
        local, remote = Store(tmp / f"{what}-local.duckdb"), Store(tmp / f"{what}-ray.duckdb")
        results = tmp / f"{what}-results"
        started = time.perf_counter()
        if what == "track":
            track(entries, "bench", local, settings)
        else:
            for path in paths:  # as `probe A B C` does: each model loaded once
                loaded = load_model(path, None, "cpu", verbose=False)
                for name in settings.probe_sets:
                    probe(loaded, name, config, store=local)
        local_s = time.perf_counter() - started
        started = time.perf_counter()
        if what == "track":
            track_ray(entries, "bench", remote, settings, results)
        else:
            probe_models_ray(paths, list(settings.probe_sets), config, remote, device="cpu",
                             results_dir=results)  # fmt: skip
        ray_s = time.perf_counter() - started
        sql = "SELECT probe_key, layer, metric, value FROM layer_metrics ORDER BY 1, 2, 3"
        a, b = local.query(sql), remote.query(sql)
        keys = ["probe_key", "layer", "metric"]
        worst = _worst_relative(a["value"].to_numpy(float), b["value"].to_numpy(float)) if a[
            keys].equals(b[keys]) else float("nan")  # fmt: skip
        segments = find_segments(results)
        seg_bytes = sum(p.stat().st_size for seg in segments for p in seg.iterdir())
        started = time.perf_counter()
        fresh = ingest_folder(Store(tmp / f"{what}-fresh.duckdb"), results)
        ingest_s = time.perf_counter() - started
        lines.append(f"{what} 3 tiny checkpoints × 2 probe sets: local {local_s:.1f} s, ray "
                     f"{ray_s:.1f} s ({local_s / ray_s:.2f}x); {len(segments)} segments "
                     f"{seg_bytes / 1e6:.2f} MB, ingest into a fresh DB {ingest_s:.2f} s "
                     f"({fresh.applied} applied), DB {remote.path.stat().st_size / 1e6:.2f} MB; "
                     f"{len(a)} layer metric values, worst relative difference {worst:.2e}")  # fmt: skip
    return lines
