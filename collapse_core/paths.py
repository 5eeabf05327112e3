"""Where Collapse Observatory keeps its files.

Everything the tool writes lives under one data directory (default: ``data/`` beside the package,
override with ``COLLAPSE_DATA``). The DuckDB file defaults to ``<data>/collapse.duckdb`` and is
overridden by ``COLLAPSE_DB`` or ``--db``.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The data directory: ``$COLLAPSE_DATA`` or ``<repo>/data``."""
    return Path(os.environ.get("COLLAPSE_DATA", REPO_ROOT / "data")).resolve()


def cache_dir() -> Path:
    """Downloaded packages and converted models (gitignored)."""
    path = data_dir() / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path


def models_dir() -> Path:
    """Converted/merged checkpoints as safetensors directories (gitignored)."""
    path = data_dir() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def uploads_dir() -> Path:
    """Where uploaded files land, under sanitised names (gitignored)."""
    path = data_dir() / "uploads"
    path.mkdir(parents=True, exist_ok=True)
    return path


def runs_dir() -> Path:
    """Adapters and merged checkpoints of pipeline runs: ``$COLLAPSE_RUNS_DIR`` or
    ``<data>/runs`` (the Ray executor points it at the shared results folder)."""
    return Path(os.environ.get("COLLAPSE_RUNS_DIR", data_dir() / "runs")).resolve()


def results_dir() -> Path:
    """Default folder of the Ray workers' result segments: ``<data>/results``."""
    return data_dir() / "results"


def default_db_path() -> Path:
    """``$COLLAPSE_DB`` or ``<data>/collapse.duckdb``."""
    return Path(os.environ.get("COLLAPSE_DB", data_dir() / "collapse.duckdb")).resolve()


def shipped_data_dir() -> Path:
    """Files we write and version in git (probe sets, stage samples): always ``<repo>/data``."""
    return REPO_ROOT / "data"


TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("", "0", "false", "no", "off")


def env_flag(name: str) -> bool:
    """A yes/no environment variable: 1/true/yes/on → True, unset/empty/0/false/no/off → False
    (case-insensitive); anything else raises a one-line :class:`CollapseError` naming the value,
    so a typo such as ``COLLAPSE_READONLY=ture`` is never read as "off"."""
    from .errors import CollapseError

    raw = os.environ.get(name, "")
    word = raw.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise CollapseError(
        f"{name}={raw[:40]!r} is not understood; use 1/true/yes to switch it on or 0/false/no "
        "(or leave it unset) to switch it off"
    )
