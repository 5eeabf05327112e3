"""Checkpoint series on disk: which checkpoints a PATH names, in which order, with which labels.

Pure filesystem work (no torch, no model loading) so that the app's pages can check a series
before queueing it; :mod:`collapse_core.track` probes what is found here.

- a folder of ``checkpoint-<step>`` sub-folders (HF Trainer / TRL ``output_dir``), sorted by step;
- a model folder, a PEFT LoRA adapter folder or a ``.gguf`` file: one checkpoint;
- a ``.toml`` file of ``label = "path"`` lines, in file order (relative paths from the file).

Labels are what the user gave (folder name, TOML label, uploaded file name); the step comes from
the name ``checkpoint-<step>`` or the folder's ``trainer_state.json``.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CollapseError

STEP_DIR = re.compile(r"^checkpoint-(\d+)$")
#: Environment variable: server folders (``os.pathsep``-separated) the app may track from.
ROOTS_ENV = "COLLAPSE_TRACK_ROOTS"


@dataclass(frozen=True)
class SeriesEntry:
    """One checkpoint of a series: the label users see, a load_model spec, the training step."""

    label: str
    path: str
    step: int | None = None


# -- discovery -----------------------------------------------------------------------------
def _clean_label(label: str) -> str:
    # stage_order is a comma-separated column; a comma inside a label would split it
    label = " ".join(str(label).replace(",", " ").split())
    if not label:
        raise CollapseError("a checkpoint label is empty; give every checkpoint a name")
    return label[:120]


def _is_model(path: Path) -> bool:
    return (path.is_file() and path.suffix.lower() == ".gguf") or (
        path.is_dir()
        and ((path / "config.json").exists() or (path / "adapter_config.json").exists())
    )


def step_of(path: Path) -> int | None:
    """Training step of a checkpoint: ``checkpoint-<step>`` in its name, else the
    ``global_step`` of its ``trainer_state.json`` (written by HF Trainer), else None."""
    match = STEP_DIR.match(path.name)
    if match:
        return int(match.group(1))
    state = path / "trainer_state.json" if path.is_dir() else None
    if state is not None and state.exists():
        try:
            value = json.loads(state.read_text(encoding="utf-8")).get("global_step")
            return int(value) if value is not None else None
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError, ValueError, OSError):
            return None
    return None


def checkpoint_folders(folder: Path) -> list[Path]:
    """``checkpoint-<step>`` sub-folders holding a model, sorted numerically by step."""
    found = [p for p in folder.iterdir() if STEP_DIR.match(p.name) and _is_model(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def _entry(path: Path, label: str | None = None) -> SeriesEntry:
    name = label or (path.stem if path.is_file() else path.name)
    return SeriesEntry(_clean_label(name), str(path.resolve()), step_of(path))


def read_series_toml(path: Path) -> list[SeriesEntry]:
    """``label = "path"`` lines in file order; relative paths are relative to the TOML file."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise CollapseError(f"{path.name} is not a valid TOML series ({err})") from err
    entries = []
    for label, value in table.items():
        if not isinstance(value, str):
            raise CollapseError(
                f'{path.name}: {label} must be a path string (label = "path"), got {value!r}'
            )
        target = Path(value).expanduser()
        target = target if target.is_absolute() else path.parent / target
        if not _is_model(target):
            raise CollapseError(f"{path.name}: {label} = {value!r} is not a model folder or .gguf")
        entries.append(_entry(target, label))
    if not entries:
        raise CollapseError(f'{path.name} lists no checkpoints; write label = "path" lines')
    return entries


def discover(paths: Sequence[str | Path]) -> list[SeriesEntry]:
    """The series the PATH arguments describe, in order (see the module docstring)."""
    entries: list[SeriesEntry] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.exists():
            raise CollapseError(f"{raw} does not exist; give checkpoint folders, .gguf or .toml")
        if path.is_file() and path.suffix.lower() == ".toml":
            entries += read_series_toml(path)
        elif _is_model(path):
            entries.append(_entry(path))
        elif path.is_dir() and (found := checkpoint_folders(path)):
            entries += [_entry(p) for p in found]
        else:
            raise CollapseError(
                f"{raw} is neither a model folder, a .gguf, a .toml series nor a folder of "
                "checkpoint-<step> model folders"
            )
    if not entries:
        raise CollapseError("no checkpoints found")
    return entries


#: config.json is read only to compare shapes; a larger one is left to :func:`load_model`.
CONFIG_JSON_CAP = 1 << 20
_SHAPE_KEYS = {"hidden size": ("hidden_size", "n_embd", "d_model"),
               "layer count": ("num_hidden_layers", "n_layer", "num_layers")}  # fmt: skip


def model_shape(path: str | Path) -> dict[str, int] | None:
    """Hidden size and layer count from a full model folder's ``config.json``, or None where it
    does not say (a LoRA adapter, a ``.gguf``, an oversized or unreadable config: loading the
    model judges those)."""
    from .validation import read_json_object  # imports torch; series.py itself must not

    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    try:  # the untrusted-JSON reader: size cap, depth limit, one-line errors
        table = read_json_object(config, "model config", max_bytes=CONFIG_JSON_CAP)
    except CollapseError:
        return None
    table = {**table, **(table.get("text_config") or {})} if isinstance(
        table.get("text_config"), dict) else table  # fmt: skip
    shape = {}
    for what, keys in _SHAPE_KEYS.items():
        value = next((table[k] for k in keys if isinstance(table.get(k), int)), None)
        if value is None:
            return None
        shape[what] = value
    return shape


def check_one_model(entries: Sequence[SeriesEntry]) -> None:
    """Refuse a series whose full-model checkpoints differ in hidden size or layer count: a
    series is one model's training run, and its stage curves and weight-update metrics compare
    checkpoints layer by layer (a mismatch otherwise fails minutes later, mid-series)."""
    first: tuple[SeriesEntry, dict[str, int]] | None = None
    for entry in entries:
        shape = model_shape(entry.path)
        if shape is None:
            continue
        if first is None:
            first = (entry, shape)
            continue
        for what, value in shape.items():
            if value != first[1][what]:
                raise CollapseError(
                    f"checkpoint {entry.label} has {what} {value} but {first[0].label} has "
                    f"{first[1][what]}; a series tracks checkpoints of one model (check --base "
                    "and the paths)"
                )


def upload_entries(uploaded: Sequence[tuple[str, str]]) -> list[SeriesEntry]:
    """(file name as uploaded, prepared path) per checkpoint → entries labelled by the user's
    file name (never the temporary folder it was unpacked to), sorted by step when every name
    is ``checkpoint-<step>``, else in upload order."""
    entries = []
    for name, path in uploaded:
        label = _clean_label(Path(name).stem if Path(name).suffix else name)
        match = STEP_DIR.match(label)
        entries.append(SeriesEntry(label, str(path), int(match.group(1)) if match else None))
    if entries and all(e.step is not None for e in entries):
        entries.sort(key=lambda e: e.step)
    return entries


def allowed_roots() -> list[Path]:
    """The folders of ``$COLLAPSE_TRACK_ROOTS`` (empty: server paths are refused)."""
    raw = os.environ.get(ROOTS_ENV, "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def check_allowed_folder(path: str | Path) -> Path:
    """``path`` resolved, if it lies under one of :func:`allowed_roots`; else CollapseError."""
    roots = allowed_roots()
    if not roots:
        raise CollapseError(
            f"tracking server folders is off; start the app with {ROOTS_ENV}=/folder/of/runs"
        )
    resolved = Path(path).expanduser().resolve()
    if not any(resolved == r or r in resolved.parents for r in roots):
        raise CollapseError(
            f"{path} is outside the allowed folders ({', '.join(str(r) for r in roots)})"
        )
    if not resolved.exists():
        raise CollapseError(f"{path} does not exist on the server")
    return resolved
