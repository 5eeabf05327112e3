"""The untrusted-input path of the app: save uploaded files, turn them into a loadable model.

Everything here treats the bytes as hostile. Two steps:

1. :func:`save_upload` streams one uploaded file to ``<data>/uploads/<uuid>/<sanitised name>``
   with a size cap (default 2 GiB, ``COLLAPSE_MAX_UPLOAD_MB`` overrides). Over the cap, or an
   empty file, is a :class:`~collapse_core.errors.CollapseError` and the partial file is deleted.
2. :func:`prepare_upload` turns what was uploaded into something
   :func:`collapse_core.models.load_model` accepts, and checks it *without loading a model*
   (config JSON and ``auto_map``, safetensors headers against file sizes, GGUF magic):

   - one ``.gguf`` file → that file;
   - ``*.safetensors`` + ``config.json`` (+ tokenizer files) uploaded together → a folder;
     likewise ``adapter_config.json`` + ``adapter_model.safetensors`` (a LoRA adapter);
   - one ``.zip`` of a Hugging Face model folder or a LoRA adapter folder → extracted with
     member path checks (no absolute paths, no ``..``, no symlinks, no encrypted members), a
     member-count cap and an expanded-size cap that is checked on the declared sizes *and* on the
     bytes actually written (zip bombs), keeping only known file types and flattening a single
     top-level folder.

Nothing is ever written outside the data directory; a failed step removes what it wrote.
Pickled weights (``.bin``/``.pt``) are dropped unless the caller opts in with ``allow_pickle``.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import struct
import uuid
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from .errors import CollapseError
from .paths import data_dir, uploads_dir

MiB = 1024 * 1024
DEFAULT_MAX_UPLOAD = 2 * 1024 * MiB
"""Default cap on one uploaded file (2 GiB); ``COLLAPSE_MAX_UPLOAD_MB`` overrides it."""
DEFAULT_MAX_EXTRACT = 4 * 1024 * MiB
"""Default cap on the total expanded size of an uploaded zip; ``COLLAPSE_MAX_EXTRACT_MB``."""
MAX_ZIP_MEMBERS = 2000
MAX_NAME_LEN = 120
CHUNK = 1 << 20

MODEL_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".jinja", ".gguf")
PICKLE_SUFFIXES = (".bin", ".pt")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]")
_DRIVE = re.compile(r"^[A-Za-z]:")


# -- limits --------------------------------------------------------------------------------
def _env_mb(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise CollapseError(f"{name}={raw!r} must be a number of megabytes, e.g. 4096") from None
    if value <= 0:
        raise CollapseError(f"{name}={raw!r} must be a positive number of megabytes")
    return int(value * MiB)


def max_upload_bytes() -> int:
    """The per-file upload cap: ``$COLLAPSE_MAX_UPLOAD_MB`` megabytes, else 2 GiB."""
    return _env_mb("COLLAPSE_MAX_UPLOAD_MB", DEFAULT_MAX_UPLOAD)


def max_extract_bytes() -> int:
    """The expanded-size cap of an uploaded zip: ``$COLLAPSE_MAX_EXTRACT_MB``, else 4 GiB."""
    return _env_mb("COLLAPSE_MAX_EXTRACT_MB", DEFAULT_MAX_EXTRACT)


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / MiB:,.0f} MB" if n_bytes >= MiB else f"{n_bytes:,} bytes"


# -- saving --------------------------------------------------------------------------------
def sanitize_filename(name: str) -> str:
    """A safe file name: basename only, ``[A-Za-z0-9._-]``, no leading dots, length-capped.

    ``"../../etc/passwd"`` → ``"passwd"``; ``"my model (1).gguf"`` → ``"my_model__1_.gguf"``;
    an empty result becomes ``"upload"``.
    """
    base = str(name).replace("\\", "/").split("/")[-1]
    base = _SAFE_CHARS.sub("_", base).lstrip(".-")
    if len(base) > MAX_NAME_LEN:
        stem, dot, suffix = base.rpartition(".")
        if dot and 0 < len(suffix) <= 16:
            base = stem[: MAX_NAME_LEN - len(suffix) - 1] + "." + suffix
        else:
            base = base[:MAX_NAME_LEN]
    return base or "upload"


def _inside(path: Path, root: Path) -> bool:
    try:
        return path.resolve().is_relative_to(root.resolve())
    except OSError:
        return False


def _chunks(data: BinaryIO | bytes | bytearray | memoryview) -> Iterable[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        view = memoryview(data)
        for start in range(0, len(view), CHUNK):
            yield bytes(view[start : start + CHUNK])
        return
    if hasattr(data, "seek"):
        try:
            data.seek(0)
        except (OSError, ValueError):
            pass  # a non-seekable stream: read from where it is
    while chunk := data.read(CHUNK):
        yield chunk


def save_upload(
    name: str, data: BinaryIO | bytes | bytearray | memoryview, max_bytes: int | None = None
) -> Path:
    """Stream one uploaded file to ``<data>/uploads/<uuid>/<sanitised name>`` and return its path.

    ``data`` is bytes or a binary file object (e.g. Streamlit's ``UploadedFile``). ``max_bytes``
    defaults to :func:`max_upload_bytes`. Raises :class:`CollapseError` (and deletes what was
    written) if the file is empty or larger than the cap.
    """
    cap = max_upload_bytes() if max_bytes is None else int(max_bytes)
    safe = sanitize_filename(name)
    folder = uploads_dir() / uuid.uuid4().hex
    folder.mkdir(parents=True)
    target = folder / safe
    written = 0
    try:
        with open(target, "xb") as out:
            for chunk in _chunks(data):
                written += len(chunk)
                if written > cap:
                    raise CollapseError(
                        f"{safe} is larger than the upload limit of {_mb(cap)}; raise it with "
                        "COLLAPSE_MAX_UPLOAD_MB (and server.maxUploadSize in "
                        ".streamlit/config.toml), or give a local path instead of uploading"
                    )
                out.write(chunk)
        if written == 0:
            raise CollapseError(f"{safe} is empty (0 bytes); upload the complete file")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return target


def discard(paths: Iterable[Path]) -> None:
    """Delete uploaded files/folders (and their ``<uuid>`` folder); ignores anything outside
    the uploads directory, so it can never remove a user's own files."""
    root = uploads_dir().resolve()
    for path in paths:
        path = Path(path)
        if not _inside(path, root) or path.resolve() == root:
            continue
        rel = path.resolve().relative_to(root)
        top = root / rel.parts[0]
        shutil.rmtree(top, ignore_errors=True)


# -- checks (fast: no model is loaded) -----------------------------------------------------
def check_gguf(path: Path) -> None:
    """Check a GGUF file's magic, version and header counts (no de-quantising)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise CollapseError(
            f"{path.name} is not a GGUF file (bad magic bytes); upload a .gguf model, or a .zip "
            "of a Hugging Face model folder"
        )
    version, n_tensors, n_kv = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3):
        raise CollapseError(f"{path.name}: GGUF version {version} is not supported (need 2 or 3)")
    # every tensor info / key-value entry takes well over 8 bytes of the header
    if n_tensors == 0 or n_tensors * 8 > size or n_kv * 8 > size:
        raise CollapseError(
            f"{path.name}: GGUF header claims {n_tensors} tensors and {n_kv} keys in a "
            f"{size:,}-byte file; the file is truncated or corrupt"
        )


def check_model_folder(path: Path, allow_pickle: bool = False) -> str:
    """Validate a model or LoRA-adapter folder without loading it; returns ``"hf"``/``"lora"``.

    Checks: config JSON (no custom code, a causal-LM ``model_type``), every safetensors header
    against its file size, tokenizer files present, pickles only with ``allow_pickle``.
    """
    from .validation import (
        read_json_object,
        validate_adapter_config,
        validate_config,
        validate_safetensors,
        validate_tokenizer_files,
        validate_weight_files,
    )

    if (path / "adapter_config.json").is_file():
        config = read_json_object(path / "adapter_config.json", "LoRA adapter")
        validate_adapter_config(config, "adapter_config.json")
        weights = path / "adapter_model.safetensors"
        if not weights.is_file():
            raise CollapseError(
                "the LoRA adapter has no adapter_model.safetensors; save it with "
                "PEFT's save_pretrained (safetensors), then zip the folder"
            )
        validate_adapter_config(config, "adapter_config.json", validate_safetensors(weights))
        return "lora"
    if not (path / "config.json").is_file():
        raise CollapseError(
            "no config.json or adapter_config.json found; upload a .zip of a Hugging Face model "
            "folder (config.json, *.safetensors, tokenizer files) or of a LoRA adapter folder"
        )
    validate_config(read_json_object(path / "config.json", "model"), "config.json")
    safetensors = sorted(path.glob("*.safetensors"))
    pickles = sorted(p for s in PICKLE_SUFFIXES for p in path.glob(f"*{s}"))
    if not safetensors:
        if pickles and not allow_pickle:
            raise CollapseError(
                "the model only has pickled weights (.bin/.pt), which can run code when loaded; "
                "convert them to .safetensors (save_pretrained(safe_serialization=True)) and "
                "upload again"
            )
        if not pickles:
            raise CollapseError(
                "config.json came without weights; add the *.safetensors file(s) of the model"
            )
    validate_weight_files(path, safetensors)
    validate_tokenizer_files(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CollapseError(
            "the model has no tokenizer files (tokenizer.json or tokenizer.model / vocab.json "
            "with tokenizer_config.json); include them (tokenizer.save_pretrained) and upload again"
        )
    return "hf"


def check_model_path(path: str | Path, allow_pickle: bool = False) -> str:
    """Quick validation of a local model spec for the UI: ``"builtin"``, ``"gguf"``, ``"hf"``,
    ``"lora"``, or a :class:`CollapseError` saying what is wrong. Reads headers only."""
    from .assets import MODEL_ALIASES

    spec = str(path).strip()
    if spec in MODEL_ALIASES:
        return "builtin"
    p = Path(spec).expanduser()
    if not spec or not p.exists():
        raise CollapseError(
            f"{spec!r} does not exist; give a model folder, a .gguf file, a LoRA adapter folder, "
            "or `smollm2`"
        )
    if p.is_dir():
        return check_model_folder(p, allow_pickle)
    if p.suffix.lower() == ".gguf":
        check_gguf(p)
        return "gguf"
    raise CollapseError(
        f"{p.name}: a single file must be a .gguf; for safetensors give the folder holding "
        "config.json, the tokenizer and *.safetensors (or a .zip of it to upload)"
    )


def full_model_problem(spec: str) -> str | None:
    """None when ``spec`` names a full model (a built-in alias, a model folder or a .gguf),
    else the one-line reason (missing path, unreadable folder, a LoRA adapter). The one check
    of every "base model" field: a pipeline run and a LoRA adapter both start from a full
    model. Headers only (:func:`check_model_path`)."""
    try:
        if check_model_path(spec) == "lora":
            return (f"{Path(spec).name} is a LoRA adapter; a base model must be a full model "
                    "(a model folder, a .gguf or `smollm2`)")  # fmt: skip
    except CollapseError as err:
        return str(err)
    return None


# -- zip extraction ------------------------------------------------------------------------
def _member_parts(name: str) -> tuple[str, ...]:
    """The path components of a zip member, or a CollapseError if it could escape."""
    norm = name.replace("\\", "/")
    if norm.startswith("/") or _DRIVE.match(norm) or "\x00" in norm:
        raise CollapseError(
            f"archive member {name!r} has an absolute path; refusing the zip (zip the folder "
            "with relative paths)"
        )
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise CollapseError(f"archive member {name!r} escapes its folder ('..'); refusing the zip")
    return parts


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _is_junk(parts: tuple[str, ...]) -> bool:
    return parts[0] == "__MACOSX" or parts[-1].startswith(".")


def _keep(parts: tuple[str, ...], allow_pickle: bool) -> bool:
    suffix = Path(parts[-1]).suffix.lower()
    return suffix in MODEL_SUFFIXES or (allow_pickle and suffix in PICKLE_SUFFIXES)


def extract_zip(
    zip_path: Path,
    dest: Path,
    allow_pickle: bool = False,
    max_expanded: int | None = None,
    max_members: int = MAX_ZIP_MEMBERS,
) -> tuple[list[str], list[str]]:
    """Safely extract the allowed members of ``zip_path`` into the empty folder ``dest``.

    Returns (kept names, dropped names). Raises :class:`CollapseError` on an unsafe member
    (absolute, ``..``, symlink, encrypted), too many members, or an expanded size over
    ``max_expanded`` (declared sizes are summed first; bytes written are counted as well).
    """
    cap = max_extract_bytes() if max_expanded is None else int(max_expanded)
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError):
        raise CollapseError(
            f"{zip_path.name} is not a valid zip archive (truncated or another format); zip the "
            "model folder and upload it again"
        ) from None
    with archive:
        infos = archive.infolist()
        if len(infos) > max_members:
            raise CollapseError(
                f"{zip_path.name} has {len(infos):,} members; the limit is {max_members:,} — "
                "zip only the model folder"
            )
        plan: list[tuple[zipfile.ZipInfo, tuple[str, ...]]] = []
        dropped: list[str] = []
        declared = 0
        for info in infos:
            parts = _member_parts(info.filename)
            if _is_symlink(info):
                raise CollapseError(
                    f"archive member {info.filename!r} is a symbolic link; refusing the zip"
                )
            if info.is_dir() or not parts:
                continue
            if info.flag_bits & 0x1:
                raise CollapseError(f"{zip_path.name} is encrypted; upload an unencrypted zip")
            if _is_junk(parts):
                continue
            if not _keep(parts, allow_pickle):
                dropped.append("/".join(parts))
                continue
            declared += info.file_size
            plan.append((info, parts))
        if declared > cap:
            raise CollapseError(
                f"{zip_path.name} expands to {_mb(declared)}, over the limit of {_mb(cap)}; "
                "raise COLLAPSE_MAX_EXTRACT_MB or give a local path instead"
            )
        free = shutil.disk_usage(dest).free
        if declared > free - 256 * MiB:
            raise CollapseError(
                f"not enough disk space to extract {zip_path.name} ({_mb(declared)} needed, "
                f"{_mb(free)} free in {data_dir()})"
            )
        root = dest.resolve()
        written = 0
        seen: set[tuple[str, ...]] = set()
        for info, parts in plan:
            if parts in seen:
                raise CollapseError(f"{zip_path.name} holds {'/'.join(parts)!r} twice")
            seen.add(parts)
            target = dest.joinpath(*parts)
            member_written = 0
            try:
                target.parent.mkdir(parents=True, exist_ok=True)
                if not target.parent.resolve().is_relative_to(root):
                    raise CollapseError(f"archive member {info.filename!r} escapes its folder")
                with archive.open(info) as src, open(target, "xb") as out:
                    while chunk := src.read(CHUNK):
                        member_written += len(chunk)
                        written += len(chunk)
                        if written > cap or member_written > info.file_size:
                            raise CollapseError(
                                f"{zip_path.name} expands past its declared sizes or the limit "
                                f"of {_mb(cap)} (a zip bomb?); refusing it"
                            )
                        out.write(chunk)
            except (zipfile.BadZipFile, EOFError, zlib.error) as err:
                raise CollapseError(
                    f"{zip_path.name}: member {'/'.join(parts)!r} is corrupt ({err}); "
                    "zip the folder again"
                ) from None
            except NotImplementedError:
                raise CollapseError(
                    f"{zip_path.name} uses a compression method Python cannot read; use plain "
                    "deflate (the default of `zip -r`)"
                ) from None
            except OSError as err:
                raise CollapseError(
                    f"could not extract {'/'.join(parts)!r} from {zip_path.name}: "
                    f"{err.strerror or err}"
                ) from None
    return ["/".join(p) for _, p in plan], dropped


def _flatten(folder: Path) -> Path:
    """Descend while the folder holds exactly one sub-folder and no files."""
    for _ in range(8):
        entries = list(folder.iterdir())
        if len(entries) == 1 and entries[0].is_dir():
            folder = entries[0]
        else:
            break
    return folder


# -- prepare -------------------------------------------------------------------------------
def _describe(paths: list[Path]) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def prepare_upload(
    paths: list[Path],
    allow_pickle: bool = False,
    max_expanded: int | None = None,
    max_members: int = MAX_ZIP_MEMBERS,
) -> Path:
    """Turn uploaded files into a path :func:`~collapse_core.models.load_model` accepts.

    See the module docstring for the accepted shapes. Uploaded files (under the uploads
    directory) are moved into the prepared folder; files elsewhere (a local path) are only read.
    Every result is checked with :func:`check_gguf` / :func:`check_model_folder` before it is
    returned. Raises a one-line :class:`CollapseError` saying what was wrong and what to upload.
    """
    paths = [Path(p) for p in paths]
    if not paths:
        raise CollapseError("nothing was uploaded; choose a .gguf, a .zip of a model folder, or "
                            "config.json + *.safetensors + tokenizer files")  # fmt: skip
    for p in paths:
        if not p.is_file():
            raise CollapseError(f"{p.name} is not a file")
        if p.stat().st_size == 0:
            raise CollapseError(f"{p.name} is empty (0 bytes); upload the complete file")
    suffixes = [p.suffix.lower() for p in paths]

    if len(paths) == 1 and suffixes[0] == ".gguf":
        check_gguf(paths[0])
        return paths[0]
    if ".gguf" in suffixes or ".zip" in suffixes:
        if len(paths) > 1:
            raise CollapseError(
                f"a .gguf or .zip must be uploaded on its own, not with {_describe(paths)}"
            )
        return _prepare_zip(paths[0], allow_pickle, max_expanded, max_members)

    names = [sanitize_filename(p.name) for p in paths]
    is_model = "config.json" in names or "adapter_config.json" in names
    if len(paths) == 1 and not is_model:
        p = paths[0]
        hint = {
            ".safetensors": "a .safetensors file needs its config.json and tokenizer files: "
            "upload them together, or zip the model folder",
            ".bin": "pickled weights are not accepted; convert to .safetensors and upload the "
            "model folder as a .zip",
            ".pt": "pickled weights are not accepted; convert to .safetensors and upload the "
            "model folder as a .zip",
        }.get(p.suffix.lower())
        raise CollapseError(
            f"{p.name}: {hint}"
            if hint
            else f"{p.name} is not a model file we accept; upload a .gguf, a .zip of a Hugging "
            "Face model or LoRA adapter folder, or config.json + *.safetensors + tokenizer files"
        )
    if not is_model:
        raise CollapseError(
            f"the uploaded files ({_describe(paths)}) include no config.json (or "
            "adapter_config.json); upload it together with the *.safetensors and tokenizer "
            "files, or zip the whole model folder"
        )
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CollapseError(f"two uploaded files are both named {dup}; upload each file once")
    bad = [p for p in paths if p.suffix.lower() not in MODEL_SUFFIXES]
    pickles = [p for p in bad if p.suffix.lower() in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise CollapseError(
            f"{pickles[0].name} is a pickle, which can run code when loaded; convert the "
            "weights to .safetensors and upload again"
        )
    # Other files (README.md, LICENSE, .gitattributes ...) are left out, as the zip route does.
    others = [p for p in bad if p.suffix.lower() not in PICKLE_SUFFIXES]
    paths = [p for p in paths if p not in others]
    discard(others)
    root = uploads_dir()
    folder = root / uuid.uuid4().hex / "model"
    folder.mkdir(parents=True)
    try:
        for p in paths:
            target = folder / sanitize_filename(p.name)
            if _inside(p, root):
                os.replace(p, target)
            else:
                shutil.copyfile(p, target)
        check_model_folder(folder, allow_pickle)
    except BaseException:
        shutil.rmtree(folder.parent, ignore_errors=True)
        raise
    finally:  # the per-file upload folders emptied by the moves
        discard(p for p in paths if p.parent != root and _inside(p.parent, root)
                and p.parent.is_dir() and not any(p.parent.iterdir()))  # fmt: skip
    return folder


def _prepare_zip(
    zip_path: Path, allow_pickle: bool, max_expanded: int | None, max_members: int
) -> Path:
    if zip_path.suffix.lower() != ".zip":
        raise CollapseError(f"{zip_path.name} must be uploaded on its own")
    root = uploads_dir()
    # named after the zip (naming.model_name skips our own folder names), so my-adapter.zip and
    # a folder my-adapter/ get the same checkpoint name
    staging = root / uuid.uuid4().hex / (sanitize_filename(zip_path.stem) or "extracted")
    staging.mkdir(parents=True)
    try:
        kept, dropped = extract_zip(zip_path, staging, allow_pickle, max_expanded, max_members)
        if not kept:
            raise CollapseError(
                f"{zip_path.name} holds no model files (.json, .safetensors, .gguf, tokenizer "
                "files); zip a Hugging Face model folder or a LoRA adapter folder"
            )
        folder = _flatten(staging)
        ggufs = sorted(folder.glob("*.gguf"))
        has_config = (folder / "config.json").is_file() or (
            folder / "adapter_config.json"
        ).is_file()
        if ggufs and not has_config:
            if len(ggufs) > 1:
                raise CollapseError(f"{zip_path.name} holds several .gguf files; upload one")
            check_gguf(ggufs[0])
            result = ggufs[0]
        else:
            dropped_pickles = any(Path(n).suffix.lower() in PICKLE_SUFFIXES for n in dropped)
            if dropped_pickles and not list(folder.glob("*.safetensors")):
                raise CollapseError(
                    f"{zip_path.name} only has pickled weights (.bin/.pt), which can run code "
                    "when loaded; convert them to .safetensors "
                    "(save_pretrained(safe_serialization=True)) and zip the folder again"
                )
            check_model_folder(folder, allow_pickle)
            result = folder
    except BaseException:
        shutil.rmtree(staging.parent, ignore_errors=True)
        raise
    discard([zip_path])  # only removes it if it was an upload
    return result


def describe_prepared(path: Path) -> str:
    """One line for the UI: what a prepared upload is and how big."""
    path = Path(path)
    if path.is_file():
        return f"GGUF file {path.name} ({_mb(path.stat().st_size)})"
    files = [p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")]
    size = sum(p.stat().st_size for p in files)
    kind = "LoRA adapter" if (path / "adapter_config.json").is_file() else "model folder"
    return f"{kind} with {len(files)} files ({_mb(size)})"
