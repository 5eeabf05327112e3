"""Load any supported checkpoint safely and describe its structure.

Accepted model specs:

- ``smollm2``: the bundled default (see :mod:`collapse_core.assets`); ``tiny-random``: a tiny
  random Llama built in code (smoke runs such as ``configs/quick.toml``);
- a Hugging Face causal-LM directory with ``config.json`` + ``*.safetensors`` + tokenizer files;
- a single ``.gguf`` file (de-quantised once and cached as a safetensors directory);
- a PEFT LoRA adapter directory (``adapter_config.json``) together with ``base=`` another spec.

Safety rules (uploaded files are untrusted): never ``trust_remote_code``; configs that ask for
custom code (``auto_map``) are refused; pickled weights (``.bin``/``.pt``) are refused unless the
caller opts in, and then only loaded with ``torch.load(weights_only=True)``; safetensors headers
are checked against the file size before anything is read; weights with NaN/Inf are rejected.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .devices import resolve_device
from .errors import CollapseError
from .gguf import convert_gguf_to_dir, gguf_cache_dir
from .naming import adapter_name, model_name
from .validation import (
    check_finite,
    hash_files,
    needs_trial,
    read_json_object,
    trial_load,
    validate_adapter_config,
    validate_config,
    validate_safetensors,
    validate_tokenizer_files,
    validate_weight_files,
    weights_hash,
)

__all__ = ["check_finite", "hash_files", "validate_config", "validate_safetensors", "weights_hash"]


@dataclass
class LoadedModel:
    """A model ready to probe, plus what the store needs to know about it."""

    model: nn.Module
    tokenizer: Any
    checkpoint_id: str
    name: str
    source: str
    kind: str
    architecture: str
    n_layers: int
    d_model: int
    n_params: int
    device: torch.device
    path: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def checkpoint_row(self) -> dict[str, Any]:
        """The ``checkpoints`` table row for this model."""
        import datetime as dt

        return {
            "checkpoint_id": self.checkpoint_id,
            "name": self.name,
            "source": self.source,
            "kind": self.kind,
            "architecture": self.architecture,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "n_params": self.n_params,
            "run_id": self.extra.get("run_id"),
            "stage": self.extra.get("stage"),
            "stage_index": self.extra.get("stage_index"),
            "path": str(self.path) if self.path else None,
            "created_at": dt.datetime.now(),
        }


# -- structure -----------------------------------------------------------------------------
@dataclass
class ModelParts:
    """The pieces of a decoder LM the probe hooks into."""

    blocks: nn.ModuleList
    final_norm: nn.Module | None
    lm_head: nn.Module
    mlp_out: list[nn.Module | None]


def model_parts(model: nn.Module) -> ModelParts:
    """Find the transformer blocks, final norm, LM head and each block's MLP output projection."""
    n_layers = getattr(model.config, "num_hidden_layers", None) or getattr(
        model.config, "n_layer", None
    )
    blocks = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            blocks = module
            break
    if blocks is None:
        raise CollapseError(f"could not find the {n_layers} transformer blocks of this model")
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    final_norm = None
    for owner in (decoder, getattr(model, "transformer", None), getattr(model, "model", None)):
        if owner is None:
            continue
        for attr in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
            if isinstance(getattr(owner, attr, None), nn.Module):
                final_norm = getattr(owner, attr)
                break
        if final_norm is not None:
            break
    mlp_out: list[nn.Module | None] = []
    for block in blocks:
        mlp = getattr(block, "mlp", None) or getattr(block, "feed_forward", None)
        proj = None
        if mlp is not None:
            for attr in ("down_proj", "c_proj", "fc2", "dense_4h_to_h", "w2"):
                if isinstance(getattr(mlp, attr, None), nn.Module):
                    proj = getattr(mlp, attr)
                    break
        mlp_out.append(proj)
    return ModelParts(blocks, final_norm, model.get_output_embeddings(), mlp_out)


def forward_accepts(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s forward (a PEFT wrapper's base model's) takes the keyword ``name``;
    False when its signature cannot be read."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(inner.forward).parameters
    except (TypeError, ValueError):
        return False


# -- loading -------------------------------------------------------------------------------
def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU (fast, range-safe), fp32 on CPU (bf16 matmuls are slow on most CPUs)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _load_dir(
    directory: Path, device: torch.device, dtype: torch.dtype, allow_pickle: bool
) -> tuple[nn.Module, Any, str]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config_path = directory / "config.json"
    raw_config = read_json_object(config_path, "model")
    validate_config(raw_config, str(config_path.name))
    safetensors = sorted(directory.glob("*.safetensors"))
    pickles = sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt"))
    if not safetensors:
        if pickles and not allow_pickle:
            raise CollapseError(
                f"{directory.name} only has pickled weights ({pickles[0].name}); pickles can run "
                "code, so convert to .safetensors or pass --allow-pickle to load with "
                "torch.load(weights_only=True)"
            )
        if not pickles:
            raise CollapseError(f"{directory} has config.json but no *.safetensors weights")
    validate_weight_files(directory, safetensors)  # sizes vs headers, before any allocation
    validate_tokenizer_files(directory)
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        if safetensors:
            model = AutoModelForCausalLM.from_pretrained(
                directory, config=config, dtype=dtype, trust_remote_code=False,
                use_safetensors=True,
            )  # fmt: skip
        else:
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
            state: dict[str, torch.Tensor] = {}
            for path in pickles:
                state.update(torch.load(path, map_location="cpu", weights_only=True))
            missing, _ = model.load_state_dict(state, strict=False)
            if [m for m in missing if "lm_head" not in m]:
                raise CollapseError(f"{pickles[0].name} misses weights such as {missing[0]}")
            model = model.to(dtype)
    except CollapseError:
        raise
    except Exception as err:
        raise CollapseError(
            f"could not load weights from {directory.name}: {type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}"
        ) from err
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
    except Exception as err:
        raise CollapseError(
            f"{directory.name} has no usable tokenizer files (tokenizer.json / tokenizer_config"
            ".json); include the tokenizer of the model"
        ) from err
    return model, tokenizer, _dir_digest(directory)


def _dir_digest(directory: Path) -> str:
    """Content hash of a model folder's weights (safetensors, else the pickles)."""
    if sorted(directory.glob("*.safetensors")):
        return weights_hash(directory)
    return hash_files(sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt")))


def _adapter_digest(base_checkpoint_id: str, adapter_dir: Path) -> str:
    """An adapter's checkpoint hash: the base's id plus the adapter weights' bytes."""
    weights = sorted(adapter_dir.glob("adapter_model.safetensors"))
    return hashlib.sha256((base_checkpoint_id + hash_files(weights)).encode()).hexdigest()


def peek_checkpoint_id(spec: str | Path, base: str | Path | None = None) -> str | None:
    """The ``checkpoint_id`` :func:`load_model` (spec, base) gives, from file hashes alone.

    No weights are loaded (the hash of each folder is cached in a sidecar by size + mtime), so
    a tracked series can tell a cache hit cheaply. None when only loading can tell: a GGUF not
    converted yet, a missing path, a LoRA adapter without a base.
    """
    from . import assets

    spec_str = str(spec)
    if spec_str in assets.MODEL_ALIASES:
        path = assets.builtin_dir(spec_str, verbose=False)
    else:
        path = Path(spec_str).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        path = gguf_cache_dir(path)
    if (path / "adapter_config.json").exists():
        base_id = peek_checkpoint_id(base) if base is not None else None
        return _adapter_digest(base_id, path)[:16] if base_id else None
    if not (path / "config.json").exists():
        return None
    return _dir_digest(path)[:16]


def load_model(
    spec: str | Path,
    base: str | Path | None = None,
    device: str = "auto",
    allow_pickle: bool = False,
    verbose: bool = True,
) -> LoadedModel:
    """Load a model spec (see module docstring) onto ``device`` in eval mode."""
    from . import assets

    torch_device = resolve_device(device)
    dtype = default_dtype(torch_device)
    spec_str = str(spec)
    if spec_str in assets.MODEL_ALIASES:
        path = assets.builtin_dir(spec_str, verbose=verbose)
        kind, name = "builtin", spec_str
    else:
        path = Path(spec_str).expanduser()
        name = model_name(path)
        if not path.exists():
            raise CollapseError(
                f"model {spec_str!r} not found; give `smollm2`, a model folder, a .gguf file or "
                "a LoRA adapter folder with --base"
            )
        kind = "hf"
        if needs_trial(path) or (base is not None and needs_trial(Path(str(base)))):
            # Untrusted upload: first load in a child with memory and time limits.
            trial_load(path, None if base is None else str(base), allow_pickle)

    if path.is_file():
        if path.stat().st_size == 0:
            raise CollapseError(f"{path.name} is empty (0 bytes); give the complete file")
        if path.suffix.lower() != ".gguf":
            raise CollapseError(
                f"{path.name}: a single file must be a .gguf; for safetensors give the folder "
                "holding config.json, tokenizer and *.safetensors"
            )
        target = gguf_cache_dir(path)
        if not (target / "config.json").exists():
            convert_gguf_to_dir(path, target, verbose=verbose)
        path, kind = target, "gguf"

    if (path / "adapter_config.json").exists():
        return _load_adapter(path, base, device, allow_pickle, verbose)
    if not (path / "config.json").exists():
        raise CollapseError(
            f"{path} has neither config.json nor adapter_config.json; it is not a model folder"
        )
    model, tokenizer, digest = _load_dir(path, torch_device, dtype, allow_pickle)
    return _finish(model, tokenizer, digest, name, spec_str, kind, torch_device, path)


def _load_adapter(
    path: Path, base: str | Path | None, device: str, allow_pickle: bool, verbose: bool
) -> LoadedModel:
    from peft import PeftConfig, PeftModel

    if base is None:
        raise CollapseError(f"{path.name} is a LoRA adapter; pass the base model with --base")
    adapter_config = read_json_object(path / "adapter_config.json", "LoRA adapter")
    weights = sorted(path.glob("adapter_model.safetensors"))
    if not weights:
        validate_adapter_config(adapter_config, f"{path.name}/adapter_config.json")
        raise CollapseError(f"{path.name} has no adapter_model.safetensors")
    shapes = validate_safetensors(weights[0])
    validate_adapter_config(adapter_config, f"{path.name}/adapter_config.json", shapes)
    base_model = load_model(base, device=device, allow_pickle=allow_pickle, verbose=verbose)
    try:
        PeftConfig.from_pretrained(path)
        peft_model = PeftModel.from_pretrained(base_model.model, path, is_trainable=False)
        merged = peft_model.merge_and_unload()
    except Exception as err:
        # torch's load_state_dict puts the useful part ("size mismatch for ...: copying a param
        # with shape ...") on the second line, under a bare "Error(s) in loading ..." heading.
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        raise CollapseError(
            f"adapter {path.name} does not fit base {base_model.name}: "
            f"{' '.join(lines[:2])[:300] or type(err).__name__}; give the base it was trained on"
        ) from err
    digest = _adapter_digest(base_model.checkpoint_id, path)
    loaded = _finish(
        merged, base_model.tokenizer, digest, adapter_name(base_model.name, path), str(path),
        "lora", base_model.device, path,
    )  # fmt: skip
    loaded.extra["base_checkpoint_id"] = base_model.checkpoint_id
    return loaded


def _finish(
    model: nn.Module,
    tokenizer: Any,
    digest: str,
    name: str,
    source: str,
    kind: str,
    device: torch.device,
    path: Path | None,
) -> LoadedModel:
    check_finite(model, name)
    model.to(device)
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    config = model.config
    n_layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    d_model = getattr(config, "hidden_size", None) or config.n_embd
    return LoadedModel(
        model=model, tokenizer=tokenizer, checkpoint_id=digest[:16], name=name, source=source,
        kind=kind, architecture=str(config.model_type), n_layers=int(n_layers),
        d_model=int(d_model), n_params=sum(p.numel() for p in model.parameters()),
        device=device, path=path,
    )  # fmt: skip
