"""Result segments: immutable per-stage exports that distributed workers write instead of a DB.

DuckDB lets one process write a file at a time, so Ray workers never open the main DB. Each
worker runs its (order, seed, arm) against a private scratch DB and, after every committed stage,
exports exactly that stage's rows as a *segment*: a folder of Parquet files (one per table) and a
``meta.json``, written under a temporary name and renamed into place, so a reader sees a whole
segment or none. Layout under a results folder (which may live on shared storage)::

    <results>/<study_id>/<run_id>/stage-000/   meta.json, checkpoints.parquet, probes.parquet, ...
    <results>/<study_id>/<run_id>/stage-001/
    <results>/<study_id>/<run_id>/status.json  (the worker's state: running / failed / done)

:func:`ingest_folder` (``python -m collapse_core ingest DIR``) merges segments into the main DB,
one transaction per segment, with the same replace semantics as a local commit (a stage's evals
replace that stage's evals, a probe replaces that probe, ...). A segment whose stage is already
stored with the same checkpoint is skipped, so ingesting twice changes nothing.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import CollapseError
from .store import Store

SEGMENT_FORMAT = 1
MAX_META_BYTES = 1_000_000
MAX_SEGMENT_BYTES = 4 * 1024**3  # a stage of a 2B model with every token vector is far smaller
_SEGMENT_NAME = re.compile(r"^stage-(\d{3,})$")

# (table, merge mode, key columns, rows of one stage). "replace": rows of the main DB with the
# same key values are deleted before the segment's rows are inserted (what a local commit does);
# "keep": a row is inserted only if its key is absent (the driver registered studies and runs).
# Selections use ? = run_id, stage_index, checkpoint_id, stage label in that order via names.
_PROBES_OF_CKPT = "probe_key IN (SELECT probe_key FROM probes WHERE checkpoint_id = $ckpt)"
SEGMENT_TABLES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("studies", "keep", ("study_id",),
     "study_id = (SELECT study_id FROM runs WHERE run_id = $run)"),
    ("runs", "keep", ("run_id",), "run_id = $run"),
    ("checkpoints", "replace", ("checkpoint_id",), "checkpoint_id = $ckpt"),
    ("probes", "replace", ("probe_key",), "checkpoint_id = $ckpt"),
    ("layer_metrics", "replace", ("probe_key",), _PROBES_OF_CKPT),
    ("spectra", "replace", ("probe_key",), _PROBES_OF_CKPT),
    ("token_samples", "replace", ("probe_key",), _PROBES_OF_CKPT),
    ("token_vectors", "replace", ("probe_key",), _PROBES_OF_CKPT),
    ("evals", "replace", ("run_id", "stage"), "run_id = $run AND stage = $label"),
    ("calibration_bins", "replace", ("checkpoint_id",), "checkpoint_id = $ckpt"),
    ("generations", "replace", ("checkpoint_id",), "checkpoint_id = $ckpt"),
    ("lora_metrics", "replace", ("run_id", "stage"), "run_id = $run AND stage = $label"),
    ("stages", "replace", ("run_id", "stage_index"), "run_id = $run AND stage_index = $index"),
)  # fmt: skip
# A standalone probe (``probe MODEL ... --executor ray``): one probe key's rows. The checkpoint
# row is kept if present, as a local probe's upsert keeps it (its name and run tags).
_PROBE_KEY = "probe_key = $key"
PROBE_SEGMENT_TABLES: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ("checkpoints", "keep", ("checkpoint_id",), "checkpoint_id = $ckpt"),
    ("probes", "replace", ("probe_key",), _PROBE_KEY),
    ("layer_metrics", "replace", ("probe_key",), _PROBE_KEY),
    ("spectra", "replace", ("probe_key",), _PROBE_KEY),
    ("token_samples", "replace", ("probe_key",), _PROBE_KEY),
    ("token_vectors", "replace", ("probe_key",), _PROBE_KEY),
)
_TABLES_OF_KIND = {"stage": SEGMENT_TABLES, "probe": PROBE_SEGMENT_TABLES}
_REQUIRED = {"stage": ("run_id", "stage_index", "checkpoint_id"),
             "probe": ("probe_key", "checkpoint_id", "probe_created_at")}  # fmt: skip
_PROBE_NAME = re.compile(r"^probe-[0-9a-f]{8,64}$")
_TABLE_NAMES = {t[0] for t in SEGMENT_TABLES}


def run_folder(results_dir: str | Path, study_id: str, run_id: str) -> Path:
    """Where one run's segments and status file live."""
    return Path(results_dir) / study_id / run_id


def segment_name(stage_index: int) -> str:
    """Folder name of stage ``stage_index``'s segment (sortable)."""
    return f"stage-{stage_index:03d}"


def probe_folder(results_dir: str | Path, checkpoint_id: str) -> Path:
    """Where the probe segments of one standalone checkpoint live."""
    return Path(results_dir) / "probes" / checkpoint_id


def _is_segment_name(name: str) -> bool:
    return bool(_SEGMENT_NAME.match(name) or _PROBE_NAME.match(name))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON under a temporary name, fsync, then rename over ``path``."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _write_segment(
    store: Store,
    target: Path,
    tables: tuple[tuple[str, str, tuple[str, ...], str], ...],
    params: dict[str, Any],
    meta: dict[str, Any],
) -> dict[str, int]:
    """Export ``tables`` (selected with ``params``) from ``store`` to a temporary folder beside
    ``target``, fsync, and rename it into place; returns the row counts. An existing ``target``
    is kept (another attempt renamed its identical copy first)."""
    folder = target.parent
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()
    rows: dict[str, int] = {}
    try:
        with store.connect() as con:
            for table, _, _, where in tables:
                used = {k: v for k, v in params.items() if f"${k}" in where}
                frame = con.sql(f"SELECT * FROM {table} WHERE {where}", params=used)
                arrow = frame.to_arrow_table()
                rows[table] = arrow.num_rows
                path = tmp / f"{table}.parquet"
                pq.write_table(arrow, path, compression="zstd")
                with open(path, "rb+") as fh:
                    os.fsync(fh.fileno())
        write_json_atomic(tmp / "meta.json", {**meta, "rows": rows,
                                               "written_at": dt.datetime.now().isoformat()})  # fmt: skip
        _fsync_dir(tmp)
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(folder)
    return rows


def write_stage_segment(
    store: Store, run_id: str, stage_index: int, folder: Path, extra_meta: dict[str, Any]
) -> Path:
    """Export the committed stage ``stage_index`` of ``run_id`` from ``store`` as an immutable
    segment under ``folder``; returns its path. An existing segment is never rewritten (a
    retried worker that re-commits a stage finds the first attempt's segment in place)."""
    target = folder / segment_name(stage_index)
    if target.exists():
        return target
    found = store.query(
        "SELECT checkpoint_id, stage, seconds FROM stages WHERE run_id = ? AND stage_index = ?",
        [run_id, stage_index],
    )
    if found.empty:
        raise CollapseError(f"stage {stage_index} of {run_id} is not committed; no segment")
    ckpt, stage, seconds = found.iloc[0]
    params = {"run": run_id, "index": stage_index, "ckpt": ckpt,
              "label": f"{stage_index}:{stage}"}  # fmt: skip
    meta = {"format": SEGMENT_FORMAT, "kind": "stage", "run_id": run_id,
            "stage_index": stage_index, "stage": stage, "checkpoint_id": ckpt,
            "stage_seconds": float(seconds) if pd.notna(seconds) else None,
            **extra_meta}  # fmt: skip
    _write_segment(store, target, SEGMENT_TABLES, params, meta)
    return target


def write_probe_segment(
    store: Store, probe_key: str, results_dir: str | Path, extra_meta: dict[str, Any]
) -> Path:
    """Export one stored probe (its checkpoint row, probe row and per-layer tables) from
    ``store`` as an immutable segment ``<results>/probes/<checkpoint>/probe-<key>``. Probe keys
    are content hashes (weights, texts, config, code), so an existing segment of the same key
    holds the same metrics and is kept."""
    found = store.query(
        "SELECT checkpoint_id, probe_set, created_at, seconds FROM probes WHERE probe_key = ?",
        [probe_key],
    )
    if found.empty:
        raise CollapseError(f"probe {probe_key} is not stored; no segment")
    ckpt, probe_set, created_at, seconds = found.iloc[0]
    target = probe_folder(results_dir, ckpt) / f"probe-{probe_key}"
    if target.exists():
        return target
    meta = {"format": SEGMENT_FORMAT, "kind": "probe", "probe_key": probe_key,
            "checkpoint_id": ckpt, "probe_set": probe_set,
            "probe_created_at": str(pd.Timestamp(created_at).to_pydatetime()),
            "probe_seconds": float(seconds), **extra_meta}  # fmt: skip
    _write_segment(store, target, PROBE_SEGMENT_TABLES, {"ckpt": ckpt, "key": probe_key}, meta)
    return target


def drop_stage_segments(folder: Path, from_index: int) -> int:
    """Remove the stage segments of a run from ``from_index`` on (a tracked series that changed
    there is rewritten; its old segments must not be ingested again); returns how many."""
    if not folder.is_dir():
        return 0
    dropped = 0
    for seg in folder.iterdir():
        match = _SEGMENT_NAME.match(seg.name)
        if match and int(match.group(1)) >= from_index:
            shutil.rmtree(seg)
            dropped += 1
    return dropped


def read_meta(segment: Path) -> dict[str, Any]:
    """A segment's ``meta.json``, validated (format, size, required fields)."""
    path = segment / "meta.json"
    if not path.is_file():
        raise CollapseError(f"{segment} is not a segment (no meta.json)")
    if path.stat().st_size > MAX_META_BYTES:
        raise CollapseError(f"{path} is larger than {MAX_META_BYTES} bytes; not a segment")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CollapseError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != SEGMENT_FORMAT:
        raise CollapseError(f"{path}: unsupported segment format {meta.get('format')!r}")
    kind = meta.setdefault("kind", "stage")
    if kind not in _REQUIRED:
        raise CollapseError(f"{path}: unknown segment kind {kind!r}")
    for key in _REQUIRED[kind]:
        if key not in meta:
            raise CollapseError(f"{path}: missing {key!r}")
    return meta


def find_segments(folder: str | Path) -> list[Path]:
    """Every complete segment under ``folder`` (temporary folders of writes in flight are not)."""
    root = Path(folder)
    if not root.is_dir():
        raise CollapseError(f"results folder {root} does not exist")
    return sorted(p.parent for p in root.rglob("meta.json") if _is_segment_name(p.parent.name))


def _read_tables(segment: Path, kind: str = "stage") -> dict[str, pa.Table]:
    size = sum(p.stat().st_size for p in segment.iterdir() if p.is_file())
    if size > MAX_SEGMENT_BYTES:
        raise CollapseError(f"segment {segment} is {size} bytes (limit {MAX_SEGMENT_BYTES})")
    tables = {}
    for path in segment.glob("*.parquet"):
        if path.stem not in {t[0] for t in _TABLES_OF_KIND[kind]}:
            raise CollapseError(f"segment {segment}: unexpected table {path.name}")
        try:
            tables[path.stem] = pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise CollapseError(f"segment {segment}: unreadable {path.name}: {err}") from err
    return tables


def _already_stored(con: Any, meta: dict[str, Any]) -> bool:
    """A stage segment is in the DB when its stage is stored with the same checkpoint; a probe
    segment when its probe row is stored with the same creation time (a newer forced re-probe
    of the same key replaces it)."""
    if meta["kind"] == "probe":
        row = con.execute(
            "SELECT created_at FROM probes WHERE probe_key = ?", [meta["probe_key"]]
        ).fetchone()
        return row is not None and str(row[0]) == meta["probe_created_at"]
    row = con.execute(
        "SELECT checkpoint_id FROM stages WHERE run_id = ? AND stage_index = ?",
        [meta["run_id"], meta["stage_index"]],
    ).fetchone()
    return row is not None and row[0] == meta["checkpoint_id"]


def ingest_segment(store: Store, segment: Path) -> bool:
    """Merge one segment into ``store`` in one transaction; False if it was already there."""
    meta = read_meta(segment)
    tables = _read_tables(segment, meta["kind"])
    with store.transaction() as con:
        if _already_stored(con, meta):
            return False
        for table, mode, key, _ in _TABLES_OF_KIND[meta["kind"]]:
            frame = tables.get(table)
            if frame is None or frame.num_rows == 0:
                continue
            known = {r[0] for r in con.execute(f"DESCRIBE {table}").fetchall()}
            extra = set(frame.column_names) - known
            if extra:
                raise CollapseError(f"segment {segment}: {table} has unknown columns {extra}")
            cols = ", ".join(f'"{c}"' for c in frame.column_names)
            match = " AND ".join(f"{table}.{k} IS NOT DISTINCT FROM s.{k}" for k in key)
            con.register("_segment_rows", frame)
            if mode == "replace":
                con.execute(
                    f"DELETE FROM {table} WHERE EXISTS (SELECT 1 FROM _segment_rows s WHERE {match})"
                )
                con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _segment_rows")
            else:
                con.execute(
                    f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _segment_rows s WHERE NOT "
                    f"EXISTS (SELECT 1 FROM {table} WHERE {match})"
                )
            con.unregister("_segment_rows")
        if meta["kind"] == "stage":
            _mark_complete_runs(con, meta["run_id"])
    return True


def _mark_complete_runs(con: Any, run_id: str) -> None:
    """A run whose every stage is stored is 'done' (as a local run marks itself at the end)."""
    con.execute(
        "UPDATE runs SET status = 'done', finished_at = (SELECT max(created_at) FROM stages "
        "WHERE run_id = $run) WHERE run_id = $run AND status <> 'done' AND (SELECT count(*) "
        "FROM stages WHERE run_id = $run) = len(string_split(stage_order, ',')) + 1",
        {"run": run_id},
    )


@dataclass
class IngestReport:
    """What :func:`ingest_folder` did: segments applied / already present, bytes read."""

    applied: int = 0
    skipped: int = 0
    bytes: int = 0
    runs: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.applied} segment(s) ingested, {self.skipped} already present, "
            f"{self.bytes / 1e6:.2f} MB read, {len(self.runs)} run(s)"
        )


def ingest_folder(
    store: Store, folder: str | Path, run_order: list[str] | None = None
) -> IngestReport:
    """Merge every segment under ``folder`` into ``store``: in ``run_order`` when given (the
    driver passes its plan order, so that rows shared by runs, e.g. the starting checkpoint's
    calibration bins, end as a local run would leave them), else by the plan index each worker
    recorded, then stage index."""
    report = IngestReport()
    metas = [(read_meta(seg), seg) for seg in find_segments(folder)]
    rank = {run: i for i, run in enumerate(run_order or [])}

    def order(item: tuple[dict, Path]) -> tuple:
        meta = item[0]
        run = meta.get("run_id", "")
        first = rank.get(run, len(rank)) if run_order else meta.get("plan_index", 0)
        return (meta.get("study_id", ""), first, run, int(meta.get("stage_index", 0)), str(item[1]))

    for meta, seg in sorted(metas, key=order):
        if run_order is not None and meta.get("run_id") not in rank:
            continue
        report.bytes += sum(p.stat().st_size for p in seg.iterdir() if p.is_file())
        if ingest_segment(store, seg):
            report.applied += 1
        else:
            report.skipped += 1
        if meta["kind"] == "stage" and meta["run_id"] not in report.runs:
            report.runs.append(meta["run_id"])
    return report


def folder_bytes(folder: str | Path) -> int:
    """Total size of the files under ``folder`` (for the closing figures and the CLI)."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def progress_table(folder: str | Path) -> pd.DataFrame:
    """One row per run found under a results folder: study_id, run_id, name, state
    (done / running / failed / queued), stages_done, n_stages, message, attempt, eta_seconds
    (time per finished stage × stages left), error, updated_at. Read from segments and each
    run's ``status.json`` only, so it works while the workers run elsewhere."""
    root = Path(folder)
    columns = ["study_id", "run_id", "name", "state", "stages_done", "n_stages", "message",
               "attempt", "eta_seconds", "error", "updated_at"]  # fmt: skip
    if not root.is_dir():
        return pd.DataFrame(columns=columns)
    rows = []
    for status_path in sorted(root.glob("*/*/status.json")):
        run = status_path.parent
        try:
            status = json.loads(status_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue  # being replaced right now: the next refresh reads it
        segments = [p for p in run.iterdir() if _SEGMENT_NAME.match(p.name)]
        done = len(segments)
        total = int(status.get("n_stages") or 0)
        seconds = []
        for seg in segments:
            try:
                seconds.append(float(read_meta(seg).get("stage_seconds") or 0.0))
            except CollapseError:
                continue
        per_stage = (sum(seconds) / max(1, len(seconds) - 1)) if len(seconds) > 1 else None
        state = "done" if total and done >= total else str(status.get("state", "queued"))
        eta = per_stage * (total - done) if per_stage and state == "running" else None
        rows.append({"study_id": run.parent.name, "run_id": run.name,
                     "name": status.get("name", run.name), "state": state, "stages_done": done,
                     "n_stages": total, "message": status.get("message", ""),
                     "attempt": status.get("attempt", 0), "eta_seconds": eta,
                     "error": status.get("error"), "updated_at": status.get("updated_at")})  # fmt: skip
    return pd.DataFrame(rows, columns=columns)
