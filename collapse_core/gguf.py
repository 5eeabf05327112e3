"""GGUF → safetensors: de-quantise a single GGUF file once and cache it as an HF directory."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .errors import CollapseError
from .paths import models_dir
from .validation import check_finite


def convert_gguf_to_dir(gguf_path: Path, target: Path, verbose: bool = True) -> Path:
    """De-quantise a GGUF file with transformers and save it as a safetensors directory.

    Runs once per file (~20-40 s on 2 CPU cores); the result reloads in well under 2 s.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    with open(gguf_path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise CollapseError(f"{gguf_path.name} is not a GGUF file (bad magic bytes)")
    if verbose:
        print(f"de-quantising {gguf_path.name} once (about 30 s) ...", flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
        )
    except CollapseError:
        raise
    except Exception as err:  # gguf parser errors come in many types
        raise CollapseError(
            f"{gguf_path.name} could not be read as a GGUF model ({type(err).__name__}); "
            "check the file is complete and is a supported architecture"
        ) from err
    # A GGUF-loaded model refuses save_pretrained; rebuild a plain one from its config.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain
    check_finite(model, gguf_path.name)
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    config = json.loads((tmp / "config.json").read_text())
    config.pop("quantization_config", None)
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def gguf_cache_dir(gguf_path: Path) -> Path:
    """Where the converted directory of ``gguf_path`` is cached (keyed by path, size, mtime)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return models_dir() / f"gguf-{gguf_path.stem[:40]}-{key.hexdigest()[:12]}"
