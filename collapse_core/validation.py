"""Checks on untrusted checkpoint files before and after loading, and their content hash.

Kept apart from :mod:`collapse_core.models` so that uploads and GGUF conversion can validate
without importing the loader.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CollapseError

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


# -- validation ----------------------------------------------------------------------------
def validate_safetensors(path: Path) -> None:
    """Check a safetensors file's header against its size before any tensor is read.

    Format (huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
    mapping tensor names to dtype/shape/data_offsets, then the data buffer.
    """
    size = path.stat().st_size
    if size < 8:
        raise CollapseError(f"{path.name} is not a safetensors file (only {size} bytes)")
    with open(path, "rb") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        if header_len > MAX_SAFETENSORS_HEADER or 8 + header_len > size:
            raise CollapseError(
                f"{path.name}: safetensors header claims {header_len} bytes but the file has "
                f"{size}; the file is truncated or corrupt, re-export it"
            )
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CollapseError(f"{path.name}: safetensors header is not valid JSON") from err
    if not isinstance(header, dict):
        raise CollapseError(f"{path.name}: safetensors header is not a JSON object")
    buffer_len = size - 8 - header_len
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            n_bytes = _DTYPE_BYTES[info["dtype"]]
            numel = 1
            for dim in info["shape"]:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError) as err:
            raise CollapseError(f"{path.name}: malformed entry for tensor {name!r}") from err
        if not (0 <= begin <= end <= buffer_len) or end - begin != numel * n_bytes:
            raise CollapseError(
                f"{path.name}: tensor {name!r} claims bytes {begin}..{end} for shape "
                f"{info['shape']} but the data buffer has {buffer_len}; the file lies about sizes"
            )


def validate_config(config: dict[str, Any], where: str) -> None:
    """Refuse configs that need remote code or are not a causal LM transformers knows."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("auto_map") or config.get("trust_remote_code"):
        raise CollapseError(
            f"{where} asks for custom code (auto_map/trust_remote_code); we never run code from "
            "model files — use a standard architecture"
        )
    model_type = config.get("model_type")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CollapseError(
            f"{where}: model_type {model_type!r} is not a causal language model transformers "
            "supports; give a decoder LM such as llama, gpt2, qwen2, mistral"
        )


def check_finite(model: nn.Module, where: str) -> None:
    """Raise if any parameter holds NaN or Inf (so no metric is ever computed on it)."""
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise CollapseError(
                f"{where}: weights contain NaN/Inf (first in {name}); the checkpoint is corrupt"
            )


def hash_files(paths: list[Path]) -> str:
    """sha256 over the bytes of the given files in name order (the weights' content hash)."""
    digest = hashlib.sha256()
    for path in sorted(paths, key=lambda p: p.name):
        digest.update(path.name.encode())
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def weights_hash(directory: Path) -> str:
    """Content hash of a checkpoint directory's weights, cached in a sidecar by size+mtime."""
    files = sorted(directory.glob("*.safetensors")) or sorted(directory.glob("*.bin"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    sidecar = directory / ".collapse_hash.json"
    if sidecar.exists():
        try:
            cached = json.loads(sidecar.read_text())
            if cached.get("stamp") == [list(s) for s in stamp]:
                return cached["hash"]
        except (json.JSONDecodeError, OSError):
            pass
    value = hash_files(files)
    try:
        sidecar.write_text(json.dumps({"stamp": stamp, "hash": value}))
    except OSError:
        pass  # read-only checkpoint folders are fine: we just hash again next time
    return value
