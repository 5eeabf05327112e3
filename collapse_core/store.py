"""DuckDB storage: the documented SQL surface of Collapse Observatory.

Why short-lived connections: DuckDB lets one process write a file at a time and a reader in another
process cannot open it while a writer holds it. The web process and worker processes therefore never
hold a connection between operations: each call opens, runs one transaction, and closes, retrying
with back-off while another process holds the lock. Every result is written in ONE transaction, so
a job killed with ``kill -9`` leaves either the whole result or nothing (DuckDB's WAL replays only
committed transactions).

Tables (all plain SQL-queryable from a notebook, see README "SQL surface"):

- ``checkpoints``: one row per distinct set of weights (``checkpoint_id`` = weights content hash).
- ``probes``: one row per probe result; ``probe_key`` hashes (weights, probe set, config, metric code).
- ``layer_metrics``: long format (probe_key, checkpoint_id, probe_set, layer, metric, value).
- ``spectra``: covariance eigenvalues per layer, descending (idx 1-based).
- ``token_samples``: the fixed-seed token subsample kept per probe (text, prompt, position, and
  the model's next-token entropy and top-1 margin at that token).
- ``token_vectors``: per (probe, layer) the sampled hidden states as a float16 row-major BLOB
  (and the logit-lens entropy and its proxy at each row as float64 bytes, NaN where the
  lens did not compute them);
  decode with :func:`decode_vectors`.
- ``studies``, ``runs``, ``stages``: pipeline runs and their checkpoints; ``method`` says how a
  run's stages were trained (``lora`` / ``full``; NULL on a stage row for the untrained base).
- ``evals``: long format (run_id, checkpoint_id, stage, eval, metric, value) with the items
  scored ``n`` and a 95 % interval ``ci_low``/``ci_high`` (``ci_method``: Wilson for rates, item
  bootstrap otherwise, NULL where a score has none; :mod:`collapse_core.eval_intervals`).
- ``calibration_bins``: reliability bins per (checkpoint, eval).
- ``generations``: generated solutions per (checkpoint, eval, item) with their sandbox status
  and the exact program that ran (HumanEval pass@1).
- ``lora_metrics``: per (run, stage, module, metric, other_stage): the geometry of each stage's
  weight update ΔW (LoRA or full fine-tuning, see ``stages.method``).
- ``correlations``: pooled Spearman ρ per study (the naive figure, kept for comparison).
- ``hypothesis_tests``: one verdict per (study, probe set, metric @ position, outcome) with the
  within-stage ρ, its cluster-bootstrap CI, permutation p, BH q and fixed-effects slope
  (:mod:`collapse_core.hypothesis`).
- ``layer_metric_ci``: per (probe, layer, metric) a 95 % CI from resampling prompts
  (:mod:`collapse_core.uncertainty`; ``method`` says how).
- ``layer_metric_boot``: the bootstrap replicates behind those CIs (float64 BLOB) with a
  ``pairing`` hash: probes with equal hashes drew the same prompts in replicate k, which gives
  paired CIs of stage-to-stage changes (:func:`collapse_core.uncertainty.stage_change_cis`).
- ``embeddings``: cached UMAP coordinates.
- ``jobs``: the background-work queue with progress.
- ``run_claims``: which process is executing a run (owner token + heartbeat), so that two
  processes running one config never commit a stage twice (see :mod:`collapse_core.runclaims`),
  plus its job, latest progress line and cancel flag (:mod:`collapse_core.lifecycle`).

Every results table has a natural key (:data:`NATURAL_KEYS`) enforced by a unique index; an
older file gets its duplicate rows removed (first row kept) and the indexes added when opened.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from .errors import CollapseError
from .paths import default_db_path

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR);
CREATE TABLE IF NOT EXISTS checkpoints (
    checkpoint_id VARCHAR PRIMARY KEY, name VARCHAR, source VARCHAR, kind VARCHAR,
    architecture VARCHAR, n_layers INTEGER, d_model INTEGER, n_params BIGINT,
    run_id VARCHAR, stage VARCHAR, stage_index INTEGER, path VARCHAR, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS probes (
    probe_key VARCHAR PRIMARY KEY, checkpoint_id VARCHAR, probe_set VARCHAR,
    probe_set_hash VARCHAR, config_json VARCHAR, code_version VARCHAR, n_prompts INTEGER,
    n_tokens BIGINT, n_layers INTEGER, device VARCHAR, seconds DOUBLE, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS layer_metrics (
    probe_key VARCHAR, checkpoint_id VARCHAR, probe_set VARCHAR, layer INTEGER,
    metric VARCHAR, value DOUBLE
);
CREATE TABLE IF NOT EXISTS spectra (
    probe_key VARCHAR, checkpoint_id VARCHAR, probe_set VARCHAR, layer INTEGER,
    idx INTEGER, eigenvalue DOUBLE
);
CREATE TABLE IF NOT EXISTS token_samples (
    probe_key VARCHAR, sample_idx INTEGER, prompt_idx INTEGER, position INTEGER,
    token_id INTEGER, token VARCHAR, prompt VARCHAR, domain VARCHAR
);
CREATE TABLE IF NOT EXISTS token_vectors (
    probe_key VARCHAR, layer INTEGER, n INTEGER, d INTEGER, data BLOB
);
CREATE TABLE IF NOT EXISTS studies (
    study_id VARCHAR PRIMARY KEY, name VARCHAR, config_json VARCHAR, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY, study_id VARCHAR, name VARCHAR, arm VARCHAR, seed INTEGER,
    stage_order VARCHAR, config_json VARCHAR, status VARCHAR, created_at TIMESTAMP,
    finished_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS stages (
    run_id VARCHAR, stage_index INTEGER, stage VARCHAR, checkpoint_id VARCHAR,
    adapter_path VARCHAR, steps INTEGER, train_loss_first DOUBLE, train_loss_last DOUBLE,
    seconds DOUBLE, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS evals (
    run_id VARCHAR, checkpoint_id VARCHAR, stage VARCHAR, eval VARCHAR, metric VARCHAR,
    value DOUBLE
);
CREATE TABLE IF NOT EXISTS calibration_bins (
    checkpoint_id VARCHAR, eval VARCHAR, bin INTEGER, lower DOUBLE, upper DOUBLE,
    count INTEGER, mean_confidence DOUBLE, accuracy DOUBLE
);
CREATE TABLE IF NOT EXISTS generations (
    checkpoint_id VARCHAR, eval VARCHAR, item_id VARCHAR, status VARCHAR, prompt VARCHAR,
    response VARCHAR, program VARCHAR
);
CREATE TABLE IF NOT EXISTS lora_metrics (
    run_id VARCHAR, stage VARCHAR, module VARCHAR, metric VARCHAR, other_stage VARCHAR,
    value DOUBLE
);
CREATE TABLE IF NOT EXISTS correlations (
    study_id VARCHAR, collapse_metric VARCHAR, outcome VARCHAR, layer VARCHAR, n INTEGER,
    spearman DOUBLE, ci_low DOUBLE, ci_high DOUBLE, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS hypothesis_tests (
    study_id VARCHAR, probe_set VARCHAR, collapse_metric VARCHAR, layer VARCHAR,
    outcome VARCHAR, expected_sign INTEGER, verdict VARCHAR, reason VARCHAR, within_rho DOUBLE,
    ci_low DOUBLE, ci_high DOUBLE, p_perm DOUBLE, q_value DOUBLE, fe_beta DOUBLE, fe_p DOUBLE,
    pooled_rho DOUBLE, pooled_ci_low DOUBLE, pooled_ci_high DOUBLE, n_checkpoints INTEGER,
    n_within INTEGER, n_runs INTEGER, n_lineages INTEGER, created_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS layer_metric_ci (
    probe_key VARCHAR, layer INTEGER, metric VARCHAR, lo DOUBLE, hi DOUBLE, method VARCHAR,
    n_boot INTEGER, n_prompts INTEGER
);
CREATE TABLE IF NOT EXISTS layer_metric_boot (
    probe_key VARCHAR, layer INTEGER, metric VARCHAR, subsample_value DOUBLE, pairing VARCHAR,
    n_boot INTEGER, replicates BLOB
);
CREATE TABLE IF NOT EXISTS embeddings (
    embedding_key VARCHAR, probe_key VARCHAR, layer INTEGER, sample_idx INTEGER,
    x DOUBLE, y DOUBLE
);
CREATE TABLE IF NOT EXISTS jobs (
    job_id VARCHAR PRIMARY KEY, kind VARCHAR, spec_json VARCHAR, status VARCHAR,
    progress DOUBLE, message VARCHAR, log_tail VARCHAR, pid INTEGER, host VARCHAR,
    cancel_requested BOOLEAN, result_json VARCHAR, error VARCHAR, created_at TIMESTAMP,
    started_at TIMESTAMP, heartbeat_at TIMESTAMP, finished_at TIMESTAMP, eta_seconds DOUBLE
);
CREATE TABLE IF NOT EXISTS run_claims (
    run_id VARCHAR PRIMARY KEY, owner VARCHAR, pid INTEGER, host VARCHAR,
    claimed_at TIMESTAMP, heartbeat_at TIMESTAMP
);
"""

# A file that looks like another engine's (an SQLite header) must not make DuckDB fetch and load
# an extension: the database path can be anything a user typed.
_NO_AUTOLOAD = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}

# The natural key of every results table without a primary key: one row per key, enforced by a
# unique index (schema version 2). Tables with a PRIMARY KEY above are already unique.
NATURAL_KEYS: dict[str, tuple[str, ...]] = {
    "layer_metrics": ("probe_key", "layer", "metric"),
    "spectra": ("probe_key", "layer", "idx"),
    "token_samples": ("probe_key", "sample_idx"),
    "token_vectors": ("probe_key", "layer"),
    "stages": ("run_id", "stage_index"),
    "evals": ("run_id", "stage", "eval", "metric"),
    "calibration_bins": ("checkpoint_id", "eval", "bin"),
    "generations": ("checkpoint_id", "eval", "item_id"),
    "lora_metrics": ("run_id", "stage", "module", "metric", "other_stage"),
    "correlations": ("study_id", "collapse_metric", "outcome", "layer"),
    "embeddings": ("embedding_key", "probe_key", "layer", "sample_idx"),
    "layer_metric_ci": ("probe_key", "layer", "metric"),
    "layer_metric_boot": ("probe_key", "layer", "metric"),
}
# Coordination state rather than results: left out of :meth:`Store.table_hashes`.
VOLATILE_TABLES = ("jobs", "run_claims")
#: Columns added after a table was first released (``CREATE TABLE IF NOT EXISTS`` keeps old
#: files as they were, so these are added on open).
ADDED_COLUMNS = (
    ("jobs", "cancel_requested_at", "TIMESTAMP"),
    ("run_claims", "job_id", "VARCHAR"),
    ("run_claims", "progress", "DOUBLE"),
    ("run_claims", "message", "VARCHAR"),
    ("run_claims", "cancel_requested", "BOOLEAN"),
    ("runs", "method", "VARCHAR"),
    ("stages", "method", "VARCHAR"),
    # The model's next-token entropy and top-1 margin at each subsample token (capture 4+;
    # NULL on older probes): per-token values give those two metrics prompt-bootstrap CIs.
    ("token_samples", "next_token_entropy", "DOUBLE"),
    ("token_samples", "top1_margin", "DOUBLE"),
    # Per (probe, layer): the logit-lens entropy of every subsample row as float64 bytes, NaN
    # where the lens did not look (capture 4+), for the lens's prompt-bootstrap CI.
    ("token_vectors", "lens_entropy", "BLOB"),
    # ... and the lens's proxy at every subsample row (capture 5+, the two-phase lens of
    # lens.py; NaN where it was not computed, NULL without one).
    ("token_vectors", "lens_proxy", "BLOB"),
    # Per eval score: the number of items scored and its 95 % interval (how: ``ci_method``;
    # :mod:`collapse_core.eval_intervals`); NULL on rows written before.
    ("evals", "n", "INTEGER"),
    ("evals", "ci_low", "DOUBLE"),
    ("evals", "ci_high", "DOUBLE"),
    ("evals", "ci_method", "VARCHAR"),
)
#: What an added column holds on the rows of a file that predates it, run once when it is added:
#: every stage trained before ``[train] method`` existed was LoRA (and has an adapter; the
#: untrained base row keeps NULL).
BACKFILLS = {
    ("runs", "method"): "UPDATE runs SET method = 'lora' WHERE method IS NULL",
    (
        "stages",
        "method",
    ): "UPDATE stages SET method = 'lora' WHERE method IS NULL AND adapter_path IS NOT NULL",
}

_LOCK_WORDS = ("lock", "Conflicting", "being used by another process")
_process_lock = threading.RLock()


def _is_lock_error(err: Exception) -> bool:
    return any(word in str(err) for word in _LOCK_WORDS)


_FULL_WORDS = ("No space left", "File too large", "Disk quota", "Could not write")


def _open_error(path: Path, err: Exception) -> CollapseError:
    """A one-line error for a database file that cannot be opened, with what to do."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    if "not a valid DuckDB" in text or "Could not read enough bytes" in text:
        why = "it is not a DuckDB database or it is truncated/corrupt"
        todo = "restore it from a backup, or point --db / COLLAPSE_DB at another file"
    elif any(w in text for w in ("Permission denied", "Operation not permitted", "Read-only")):
        why = "the file or its folder is read-only"
        todo = "make it writable, or open it in viewer mode (COLLAPSE_READONLY=1)"
    elif any(w in text for w in _FULL_WORDS):
        why = "the disk is full"
        todo = "free some space and try again"
    else:
        why = text[:160]
        todo = "check the path, or point --db / COLLAPSE_DB at another file"
    return CollapseError(f"cannot open database {path}: {why}; {todo}")


def _write_error(path: Path, err: Exception) -> CollapseError | None:
    """A one-line error for a write that failed for lack of space/permission, else None."""
    text = str(err).splitlines()[0] if str(err) else ""
    if not any(w in text for w in (*_FULL_WORDS, "Permission denied", "Read-only")):
        return None
    return CollapseError(
        f"could not write to database {path} ({text[:160]}); nothing was saved — free disk "
        "space or fix the file's permissions, then run it again"
    )


def _rollback_quietly(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.execute("ROLLBACK")
    except duckdb.Error:
        pass  # a failed COMMIT has already ended the transaction


def _add_natural_keys(con: duckdb.DuckDBPyConnection) -> None:
    """Migration 1 → 2: drop duplicate rows (keeping the first stored) and add the unique index
    of each natural key. A file written before the indexes existed could hold every stage twice
    when two processes ran one config at once."""
    present = {r[0] for r in con.execute("SELECT index_name FROM duckdb_indexes()").fetchall()}
    for table, key in NATURAL_KEYS.items():
        name = f"{table}_natural_key"
        if name in present:
            continue
        cols = ", ".join(key)
        # Two statements in autocommit: DuckDB's index build still sees rows deleted earlier
        # in the same transaction. A crash in between leaves a deduplicated table without
        # its index, which the next open completes.
        con.execute(
            f"DELETE FROM {table} WHERE rowid NOT IN (SELECT min(rowid) FROM {table} GROUP BY {cols})"
        )
        con.execute(f"CREATE UNIQUE INDEX {name} ON {table} ({cols})")


def encode_vectors(vectors: np.ndarray) -> bytes:
    """Pack an (n, d) array as float16 row-major bytes for ``token_vectors.data``."""
    return np.ascontiguousarray(vectors, dtype=np.float16).tobytes()


def decode_vectors(data: bytes, n: int, d: int) -> np.ndarray:
    """Inverse of :func:`encode_vectors`: float32 array of shape (n, d)."""
    return np.frombuffer(data, dtype=np.float16).reshape(n, d).astype(np.float32)


class Store:
    """A DuckDB file with the Collapse Observatory schema; safe across processes.

    ``Store()`` uses ``$COLLAPSE_DB`` or ``data/collapse.duckdb``. ``read_only=True`` (the
    viewer) never creates, migrates or writes the file: it must exist, every connection is opened
    read-only (so a 0444 file can be viewed) and every write raises a :class:`CollapseError`.
    """

    def __init__(
        self, path: str | Path | None = None, lock_timeout: float = 60.0, read_only: bool = False
    ) -> None:
        self.path = Path(path) if path is not None else default_db_path()
        self.lock_timeout = lock_timeout
        self.read_only = read_only
        if read_only:
            if not self.path.is_file():
                raise CollapseError(
                    f"database {self.path} not found; the read-only viewer never creates one "
                    "(check COLLAPSE_DB)"
                )
            with self.connect(read_only=True) as con:
                con.execute("SELECT 1")
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _open_error(self.path, err) from None
        self._ensure_schema()

    # -- connections -------------------------------------------------------------------------
    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """Open a short-lived connection, retrying while another process holds the file lock.

        Read-only connections are used only across processes; within one process every
        connection is read-write (DuckDB refuses mixed configurations on one file).
        """
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.02
        read_only = read_only or self.read_only
        with _process_lock:
            while True:
                try:
                    con = duckdb.connect(
                        str(self.path),
                        read_only=read_only and self.path.exists(),
                        config=_NO_AUTOLOAD,
                    )
                    break
                except duckdb.Error as err:
                    if self.read_only and not _is_lock_error(err):
                        raise CollapseError(
                            f"cannot open the database {self.path} read-only: "
                            + " ".join(str(err).split())[:200]
                        ) from err
                    if not _is_lock_error(err) or time.monotonic() > deadline:
                        if _is_lock_error(err):
                            raise CollapseError(
                                f"database {self.path} stayed locked by another process for "
                                f"{self.lock_timeout:.0f} s; wait for the running job or stop it"
                            ) from err
                        raise _open_error(self.path, err) from None
                    time.sleep(delay * (1 + random.random()))
                    delay = min(delay * 2, 0.5)
            try:
                yield con
            except duckdb.IOException as err:  # e.g. a file truncated after the header
                raise (_write_error(self.path, err) or _open_error(self.path, err)) from None
            finally:
                try:
                    con.close()
                except duckdb.Error as err:  # closing checkpoints: it can hit a full disk
                    raise (_write_error(self.path, err) or _open_error(self.path, err)) from None

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside BEGIN/COMMIT; rolled back on any exception."""
        if self.read_only:
            raise CollapseError(f"database {self.path} is open read-only; nothing can be written")
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException as err:
                _rollback_quietly(con)
                full = _write_error(self.path, err) if isinstance(err, duckdb.Error) else None
                if full is not None:
                    raise full from None
                raise
            try:
                con.execute("COMMIT")
            except duckdb.Error as err:
                _rollback_quietly(con)
                raise (_write_error(self.path, err) or err) from None

    def _ensure_schema(self) -> None:
        with self.connect() as con:
            try:
                con.execute(SCHEMA)
                _add_natural_keys(con)
                present = set(con.execute(
                    "SELECT table_name, column_name FROM information_schema.columns"
                ).fetchall())  # fmt: skip
                for table, column, kind in ADDED_COLUMNS:
                    if (table, column) in present:
                        continue
                    con.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")
                    if (table, column) in BACKFILLS:
                        con.execute(BACKFILLS[(table, column)])
                con.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                    [str(SCHEMA_VERSION)],
                )
            except duckdb.Error as err:
                raise _open_error(self.path, err) from None

    # -- generic helpers ---------------------------------------------------------------------
    def query(self, sql: str, params: Sequence[Any] | None = None) -> pd.DataFrame:
        """Run a read query and return a DataFrame (read-only connection across processes)."""
        with self.connect(read_only=True) as con:
            return con.execute(sql, params or []).df()

    def columns(self, table: str) -> set[str]:
        """The columns ``table`` has in this file (empty if it has no such table). A read-only
        store never adds :data:`ADDED_COLUMNS`, so readers of newer columns check here."""
        df = self.query(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table]
        )
        return set(df["column_name"])

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        """Run one write statement in its own transaction."""
        with self.transaction() as con:
            con.execute(sql, params or [])

    @staticmethod
    def insert_df(con: duckdb.DuckDBPyConnection, table: str, df: pd.DataFrame) -> None:
        """Append a DataFrame to ``table`` by column name (inside the caller's transaction)."""
        if df.empty:
            return
        con.register("_insert_frame", df)
        cols = ", ".join(f'"{c}"' for c in df.columns)
        con.execute(f"INSERT INTO {table} ({cols}) SELECT {cols} FROM _insert_frame")
        con.unregister("_insert_frame")

    def table_hashes(self) -> dict[str, str]:
        """Order-independent content hash of every table (used to prove bad input changed nothing)."""
        out: dict[str, str] = {}
        with self.connect(read_only=True) as con:
            tables = [r[0] for r in con.execute("SHOW TABLES").fetchall()]
            for table in sorted(tables):
                if table in VOLATILE_TABLES:
                    continue
                row = con.execute(
                    f"SELECT count(*), coalesce(sum(hash(t)), 0) FROM {table} t"
                ).fetchone()
                out[table] = f"{row[0]}:{row[1]}"
        return out

    # -- probes ------------------------------------------------------------------------------
    def has_probe(self, probe_key: str) -> bool:
        """Whether a complete probe result with this key is stored."""
        df = self.query("SELECT 1 FROM probes WHERE probe_key = ?", [probe_key])
        return not df.empty

    def upsert_checkpoint(self, con: duckdb.DuckDBPyConnection, row: dict[str, Any]) -> None:
        """Insert a checkpoint row unless it exists (inside the caller's transaction); an existing
        row keeps its name, and its run tags unless it was a standalone checkpoint (no run)."""
        exists = con.execute(
            "SELECT run_id FROM checkpoints WHERE checkpoint_id = ?", [row["checkpoint_id"]]
        ).fetchone()
        if exists and exists[0] is None:
            return  # probed outside any run first: a run starting from it must not take it over
        if exists:
            updates = {k: v for k, v in row.items() if k in ("run_id", "stage", "stage_index")}
            updates = {k: v for k, v in updates.items() if v is not None}
            if updates:
                sets = ", ".join(f"{k} = ?" for k in updates)
                con.execute(
                    f"UPDATE checkpoints SET {sets} WHERE checkpoint_id = ?",
                    [*updates.values(), row["checkpoint_id"]],
                )
            return
        self.insert_df(con, "checkpoints", pd.DataFrame([row]))

    def write_probe(
        self,
        checkpoint: dict[str, Any],
        probe: dict[str, Any],
        layer_metrics: pd.DataFrame,
        spectra: pd.DataFrame,
        token_samples: pd.DataFrame,
        token_vectors: pd.DataFrame,
    ) -> None:
        """Store one probe result atomically (all tables or none)."""
        with self.transaction() as con:
            self.upsert_checkpoint(con, checkpoint)
            key = probe["probe_key"]
            for table in ("layer_metrics", "spectra", "token_samples", "token_vectors", "probes"):
                con.execute(f"DELETE FROM {table} WHERE probe_key = ?", [key])
            self.insert_df(con, "layer_metrics", layer_metrics)
            self.insert_df(con, "spectra", spectra)
            self.insert_df(con, "token_samples", token_samples)
            self.insert_df(con, "token_vectors", token_vectors)
            self.insert_df(con, "probes", pd.DataFrame([probe]))

    def layer_metrics(self, probe_key: str) -> pd.DataFrame:
        """All metrics of one probe in long format."""
        return self.query(
            "SELECT layer, metric, value FROM layer_metrics WHERE probe_key = ? "
            "ORDER BY metric, layer",
            [probe_key],
        )

    def token_vectors(self, probe_key: str, layer: int) -> np.ndarray:
        """The stored token subsample of one probe at one layer, shape (n, d), float32."""
        df = self.query(
            "SELECT n, d, data FROM token_vectors WHERE probe_key = ? AND layer = ?",
            [probe_key, layer],
        )
        if df.empty:
            raise CollapseError(f"no token vectors stored for probe {probe_key} layer {layer}")
        row = df.iloc[0]
        return decode_vectors(bytes(row["data"]), int(row["n"]), int(row["d"]))


@contextmanager
def writes_held() -> Iterator[None]:
    """No other thread of this process opens a connection inside this block (the lock every
    :meth:`Store.connect` takes): a process that must exit at once does it from in here, so no
    transaction of its own is left half-done."""
    with _process_lock:
        yield


def dumps(obj: Any) -> str:
    """Canonical JSON (sorted keys) used in config columns and cache keys."""
    return json.dumps(obj, sort_keys=True, default=str)
