"""One naming rule for checkpoints, whichever way they arrive (CLI path, upload, run stage).

A checkpoint is named, in order of preference:

1. the name the user typed (upload form, ``rename_checkpoint``);
2. the path's own name (file or folder), else its parent folder's, skipping the names our own
   code invents (``extracted``, ``model``, upload ids) — a zip is extracted into a folder named
   after it, so ``my-adapter.zip`` and the folder ``my-adapter/`` give the same name;
3. ``"uploaded model"``.

A LoRA adapter merged onto a base is ``"<base>+<adapter>"`` under the same rule, so the CLI and
the upload page name the same adapter the same way. The database keeps the first name of a
set of weights; :func:`rename_checkpoint` changes it.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import CollapseError
from .store import Store

#: Folder names made by this project's upload code, never by a user.
GENERATED_PARTS = frozenset({"extracted", "model", "uploads", "upload", "tmp", ""})
_GENERATED = re.compile(r"^[0-9a-f]{32}$|^tmp[\w-]*$", re.I)
MAX_NAME = 80
FALLBACK = "uploaded model"


def is_generated(part: str) -> bool:
    """Whether a path component was made by our code (an upload id, ``extracted`` ...)."""
    return part.lower() in GENERATED_PARTS or bool(_GENERATED.match(part))


def model_name(path: str | Path) -> str:
    """Rule 2 of the module docstring: the path's own name (a file keeps its suffix), else its
    parent folder's, unless that is generated too."""
    path = Path(str(path).rstrip("/"))
    for part in (path.name, path.parent.name):
        if not is_generated(part):
            return part
    return FALLBACK


def adapter_name(base_name: str, adapter_path: str | Path) -> str:
    """``"<base>+<adapter>"`` with the adapter named by :func:`model_name`."""
    return f"{base_name}+{model_name(adapter_path)}"


def clean_name(name: str) -> str:
    """A user-typed name, stripped and checked: one line, 1..80 characters."""
    text = " ".join(str(name).split())
    if not text:
        raise CollapseError("a checkpoint name cannot be empty")
    if len(text) > MAX_NAME:
        raise CollapseError(f"a checkpoint name has at most {MAX_NAME} characters")
    return text


def rename_checkpoint(store: Store, checkpoint_id: str, name: str) -> str:
    """Give a stored checkpoint a new display name; returns the cleaned name."""
    text = clean_name(name)
    with store.transaction() as con:
        if not con.execute(
            "SELECT 1 FROM checkpoints WHERE checkpoint_id = ?", [checkpoint_id]
        ).fetchone():
            raise CollapseError(f"no checkpoint {checkpoint_id}")
        con.execute(
            "UPDATE checkpoints SET name = ? WHERE checkpoint_id = ?", [text, checkpoint_id]
        )
    return text
