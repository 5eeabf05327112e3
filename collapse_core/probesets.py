"""Probe sets: the texts whose hidden states we measure.

Four hand-written, versioned sets ship in ``data/probesets/`` (``general``, ``math``, ``code``,
``refusal``; 64 items each, one JSON object per line: ``{"id", "text", "domain"}``) plus the virtual
set ``mixed`` (their union, in that order). Versions and descriptions live in the sidecar
``data/probesets/manifest.json``. Users may also point at their own file:

* ``.txt``: one text per non-empty line (ids are the 1-based line numbers);
* ``.jsonl``: one object per line with a ``"text"`` string and optional ``"id"`` / ``"domain"``.

Every :class:`ProbeSet` carries a ``content_hash``: the first 16 hex digits of
``sha256(json.dumps([version, list(texts)], ensure_ascii=False))``. It changes whenever a text or
the version changes, and it is what probe results are keyed by.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from collapse_core.errors import CollapseError
from collapse_core.paths import shipped_data_dir

MAX_FILE_BYTES = 20 * 1024 * 1024
MAX_ITEMS = 100_000
USER_VERSION = "user"
MIXED = "mixed"


@dataclass(frozen=True)
class ProbeSet:
    """An ordered, immutable list of probe texts with ids, domains and a content hash."""

    name: str
    version: str
    texts: tuple[str, ...]
    ids: tuple[str, ...]
    domains: tuple[str, ...]
    content_hash: str

    def __len__(self) -> int:
        return len(self.texts)


def probe_hash(version: str, texts: tuple[str, ...] | list[str]) -> str:
    """The content hash of a probe set: sha256 over ``[version, texts]`` as JSON, hex[:16]."""
    payload = json.dumps([version, list(texts)], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def _probesets_dir() -> Path:
    return shipped_data_dir() / "probesets"


def _manifest() -> dict[str, dict]:
    path = _probesets_dir() / "manifest.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CollapseError(
            f"probe set manifest {path} is missing; restore data/probesets/ from git"
        ) from None


def list_probe_sets() -> list[str]:
    """Names of the built-in probe sets (the four files, then ``mixed``)."""
    return list(_manifest())


def describe_probe_sets() -> dict[str, dict]:
    """The manifest: ``{name: {"version": ..., "description": ...}}`` for each built-in set."""
    return _manifest()


def _make(
    name: str, version: str, rows: list[tuple[str, str, str]], max_items: int | None
) -> ProbeSet:
    if max_items is not None:
        rows = rows[:max_items]
    texts = tuple(r[1] for r in rows)
    return ProbeSet(
        name=name,
        version=version,
        texts=texts,
        ids=tuple(r[0] for r in rows),
        domains=tuple(r[2] for r in rows),
        content_hash=probe_hash(version, texts),
    )


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise CollapseError(f"probe file {path} not found")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise CollapseError(
            f"probe file {path.name} is {size / 1e6:.1f} MB; the limit is 20 MB, so split it or keep fewer texts"
        )
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        raise CollapseError(
            f"probe file {path.name} is not valid UTF-8 text; save it as UTF-8"
        ) from None


def _parse_txt(path: Path, raw: str) -> list[tuple[str, str, str]]:
    rows = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        text = line.strip()
        if text:
            rows.append((str(lineno), text, "user"))
    return rows


def _parse_jsonl(path: Path, raw: str) -> list[tuple[str, str, str]]:
    rows = []
    seen: set[str] = set()
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise CollapseError(
                f"probe file {path.name} line {lineno} is not valid JSON ({err.msg}); "
                'each line must be an object like {"text": "..."}'
            ) from None
        except RecursionError:
            raise CollapseError(
                f"probe file {path.name} line {lineno} nests too deeply; each line must be a "
                'flat object like {"text": "..."}'
            ) from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CollapseError(
                f'probe file {path.name} line {lineno} needs a "text" string, e.g. {{"text": "..."}}'
            )
        text = obj["text"].strip()
        if not text:
            continue
        for key in ("id", "domain"):
            if key in obj and (type(obj[key]) not in (str, int) or len(str(obj[key])) > 200):
                raise CollapseError(
                    f'probe file {path.name} line {lineno}: "{key}" must be a short string or '
                    "a whole number"
                )
        item_id = str(obj.get("id", lineno))
        if item_id in seen:
            raise CollapseError(f"probe file {path.name} line {lineno} repeats the id {item_id!r}")
        seen.add(item_id)
        domain = str(obj.get("domain", "user"))
        rows.append((item_id, text, domain))
    return rows


def _load_user_file(path: Path, max_items: int | None, builtin: dict[str, dict]) -> ProbeSet:
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise CollapseError(
            f"probe file {path.name} has an unsupported type {suffix or '(none)'!r}; use .txt or .jsonl"
        )
    if path.stem in builtin:
        # The set is stored under its file stem: "general.txt" would file its numbers under the
        # built-in "general" and the views (latest probe per set name) would show them as that.
        raise CollapseError(
            f"probe file {path.name} would be stored as probe set {path.stem!r}, the name of a "
            f"built-in set; rename the file (e.g. my_{path.name})"
        )
    raw = _read_text(path)
    rows = _parse_txt(path, raw) if suffix == ".txt" else _parse_jsonl(path, raw)
    if not rows:
        raise CollapseError(f"probe file {path.name} has no non-empty texts")
    if len(rows) > MAX_ITEMS:
        raise CollapseError(
            f"probe file {path.name} has {len(rows):,} texts; the limit is {MAX_ITEMS:,}"
        )
    return _make(path.stem, USER_VERSION, rows, max_items)


def _load_builtin(name: str, manifest: dict[str, dict]) -> list[tuple[str, str, str]]:
    path = _probesets_dir() / f"{name}.jsonl"
    if not path.is_file():
        raise CollapseError(
            f"built-in probe set file {path} is missing; restore data/probesets/ from git"
        )
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            obj = json.loads(line)
            rows.append((obj["id"], obj["text"], obj["domain"]))
    return rows


def load_probe_set(name_or_path: str, max_items: int | None = None) -> ProbeSet:
    """Load a built-in probe set by name, or a user ``.txt`` / ``.jsonl`` file by path.

    ``max_items`` keeps only the first ``max_items`` texts (the hash covers what is kept).
    A user file's set name is its file stem and its version is ``"user"``; a stem that names a
    built-in set is refused (its numbers would be shown as the built-in set's). Raises
    :class:`CollapseError` for a missing or unreadable file, non-UTF-8 text, a bad JSON line, an
    empty set, a file over 20 MB or more than 100,000 texts.
    """
    if max_items is not None and (not isinstance(max_items, int) or max_items < 1):
        raise CollapseError(f"max_items must be a positive whole number, not {max_items!r}")
    manifest = _manifest()
    key = str(name_or_path)
    if key in manifest:
        version = str(manifest[key]["version"])
        members = manifest[key].get("members")
        if members:
            rows = [row for member in members for row in _load_builtin(member, manifest)]
        else:
            rows = _load_builtin(key, manifest)
        return _make(key, version, rows, max_items)
    path = Path(key).expanduser()
    if path.suffix.lower() in (".txt", ".jsonl") or path.exists():
        return _load_user_file(path, max_items, manifest)
    raise CollapseError(
        f"unknown probe set {key!r}: use one of {', '.join(manifest)} or a path to a .txt/.jsonl file"
    )
