"""Checks on untrusted checkpoint files before and after loading, and their content hash.

Kept apart from :mod:`collapse_core.models` so that uploads and GGUF conversion can validate
without importing the loader.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CollapseError

MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
#: Caps on JSON files from untrusted folders: bytes and nesting depth (real configs nest < 8).
MAX_JSON_BYTES = 8 * 1024 * 1024
MAX_JSON_DEPTH = 64
#: Absolute caps on the sizes a config may claim, checked before any model object is built
#: (the largest public decoders stay well inside: Llama 3.1 405B has 126 layers, width 16384,
#: FFN 53248; Gemma has a 256k vocabulary). None means "the architecture's default".
CONFIG_SIZE_CAPS = {
    "num_hidden_layers": 512, "n_layer": 512, "num_layers": 512,
    "hidden_size": 65536, "n_embd": 65536, "d_model": 65536,
    "intermediate_size": 262144, "n_inner": 262144, "ffn_dim": 262144,
    "vocab_size": 2_000_000,
    "num_attention_heads": 4096, "n_head": 4096, "num_key_value_heads": 4096,
    "head_dim": 8192,
    "max_position_embeddings": 16_777_216, "n_positions": 16_777_216,
    "num_experts": 1024, "num_local_experts": 1024, "num_experts_per_tok": 1024,
}  # fmt: skip
#: LoRA adapters: rank cap and the shape of a plain module name (no regex metacharacters).
MAX_LORA_RANK = 512
MAX_TARGET_MODULES = 256
_PLAIN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
#: Chat templates longer than this are refused (real ones are < 20 KB).
MAX_CHAT_TEMPLATE_CHARS = 64 * 1024
_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}  # fmt: skip


# -- validation ----------------------------------------------------------------------------
def json_depth_ok(obj: Any, limit: int = MAX_JSON_DEPTH) -> bool:
    """True when ``obj`` (parsed JSON) nests at most ``limit`` containers deep (iterative)."""
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > limit:
                return False
            values = item.values() if isinstance(item, dict) else item
            stack.extend((v, depth + 1) for v in values if isinstance(v, (dict, list)))
    return True


def parse_json(text: str | bytes, where: str) -> Any:
    """``json.loads`` for untrusted text: invalid JSON, nesting past :data:`MAX_JSON_DEPTH`
    (which would otherwise surface as a RecursionError) → one-line :class:`CollapseError`."""
    deep = f"{where} nests deeper than {MAX_JSON_DEPTH} levels; it is not a real config"
    try:
        obj = json.loads(text)
    except RecursionError:
        raise CollapseError(deep) from None
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as err:
        raise CollapseError(f"{where} is not valid JSON ({str(err)[:80]})") from None
    if not json_depth_ok(obj):
        raise CollapseError(deep)
    return obj


def read_json_object(path: Path, what: str, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Read an untrusted JSON object file with a size cap and :func:`parse_json`."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CollapseError(
                f"{path.name} is {size:,} bytes, over the {max_bytes:,}-byte limit for a "
                f"{what} file"
            )
        raw = path.read_bytes()
    except OSError as err:
        raise CollapseError(f"cannot read {path.name}: {err.strerror or err}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CollapseError(
            f"{path.name} is not valid JSON (not UTF-8); re-export the {what}"
        ) from None
    obj = parse_json(text, path.name)
    if not isinstance(obj, dict):
        raise CollapseError(f"{path.name} is not a JSON object; re-export the {what}")
    return obj


def validate_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Check a safetensors file's header against its size before any tensor is read.

    Format (huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
    mapping tensor names to dtype/shape/data_offsets, then the data buffer. Returns each tensor's
    shape by name.
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
        header = parse_json(fh.read(header_len), f"{path.name}: safetensors header")
    if not isinstance(header, dict):
        raise CollapseError(f"{path.name}: safetensors header is not a JSON object")
    buffer_len = size - 8 - header_len
    shapes: dict[str, tuple[int, ...]] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = info["data_offsets"]
            n_bytes = _DTYPE_BYTES[info["dtype"]]
            shape = tuple(info["shape"])
            if not all(type(d) is int and d >= 0 for d in shape):
                raise TypeError("shape")
            if type(begin) is not int or type(end) is not int:
                raise TypeError("offsets")
            numel = math.prod(shape)
        except (KeyError, TypeError, ValueError) as err:
            raise CollapseError(
                f"{path.name}: malformed entry for tensor {str(name)[:60]!r} (dtype, shape and "
                "data_offsets must be a known dtype and lists of whole numbers)"
            ) from err
        if not (0 <= begin <= end <= buffer_len) or end - begin != numel * n_bytes:
            raise CollapseError(
                f"{path.name}: tensor {name!r} claims bytes {begin}..{end} for shape "
                f"{info['shape']} but the data buffer has {buffer_len}; the file lies about sizes"
            )
        shapes[name] = shape
    return shapes


def validate_config(config: dict[str, Any], where: str) -> None:
    """Refuse configs that need remote code or are not a causal LM transformers knows."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if config.get("auto_map") or config.get("trust_remote_code"):
        raise CollapseError(
            f"{where} asks for custom code (auto_map/trust_remote_code); we never run code from "
            "model files — use a standard architecture"
        )
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CollapseError(
            f"{where}: model_type {str(model_type)[:60]!r} is not a causal language model "
            "transformers supports; give a decoder LM such as llama, gpt2, qwen2, mistral"
        )
    for section in (config, config.get("text_config")):
        if not isinstance(section, dict):
            continue
        for key, cap in CONFIG_SIZE_CAPS.items():
            value = section.get(key)
            if value is None:
                continue
            if type(value) is not int or not 0 < value <= cap:
                raise CollapseError(
                    f"{where}: {key} = {repr(value)[:40]} must be a whole number from 1 to "
                    f"{cap:,}; the config is corrupt or hostile"
                )


def _strip_prefix(name: str, prefix: str) -> str:
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def validate_weights_match_config(directory: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """Compare the parameter shapes ``config.json`` implies with the safetensors headers, before
    any real tensor is allocated.

    The model is built on PyTorch's ``meta`` device (shapes only, no memory), after
    :func:`validate_config` has capped the sizes. Any parameter whose header shape differs, or
    parameters the weights lack worth more than 1 % of the model (when the weights also hold
    fewer numbers in total than the config implies, so renamed or fused keys pass), mean the
    config does not describe these weights (e.g. it claims 10 000 layers): loading would
    allocate and randomly initialise what is missing, so it is refused.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except CollapseError:
        raise
    except Exception as err:
        raise CollapseError(
            f"config.json in {directory.name} does not describe a model transformers can "
            f"build: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
        ) from None
    prefix = getattr(model, "base_model_prefix", "") or ""
    header = {_strip_prefix(k, prefix): v for k, v in shapes.items()}
    expected_total = missing_total = 0
    first_missing = ""
    for name, param in model.named_parameters():
        want = tuple(param.shape)
        expected_total += param.numel()
        got = header.get(_strip_prefix(name, prefix))
        if got is None:
            missing_total += param.numel()
            first_missing = first_missing or name
        elif got != want:
            raise CollapseError(
                f"{directory.name}: weight {name} has shape {list(got)} but config.json implies "
                f"{list(want)}; the config does not describe these weights"
            )
    held = sum(math.prod(shape) for shape in shapes.values())
    # Names can differ legitimately (checkpoint key renames, experts fused into one tensor at
    # load time), so missing names only count when the weights also hold fewer numbers.
    if missing_total > 0.01 * expected_total and expected_total > 1.01 * held:
        raise CollapseError(
            f"{directory.name}: config.json describes {expected_total:,} parameters but the "
            f"weights lack {missing_total:,} of them (e.g. {first_missing}); the config does not "
            "describe these weights"
        )


def validate_weight_files(directory: Path, safetensors: list[Path]) -> None:
    """Every safetensors header against its file (:func:`validate_safetensors`), then the
    config's implied shapes against those headers (:func:`validate_weights_match_config`)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for path in safetensors:
        shapes.update(validate_safetensors(path))
    if safetensors:
        validate_weights_match_config(directory, shapes)


def validate_tokenizer_files(directory: Path) -> None:
    """Size/depth caps on ``tokenizer_config.json`` and the chat template (``chat_template``
    in that file, ``chat_template.jinja`` or ``chat_template.json``)."""
    config_path = directory / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_path.is_file():
        config = read_json_object(config_path, "tokenizer", max_bytes=64 * 1024 * 1024)
    special = {k: v for k in ("bos_token", "eos_token") if isinstance(v := config.get(k), str)}
    validate_chat_template(config.get("chat_template"), config_path.name, special)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        if jinja.stat().st_size > 4 * MAX_CHAT_TEMPLATE_CHARS:
            raise CollapseError(f"{jinja.name} is over the chat template limit")
        try:
            validate_chat_template(jinja.read_text(encoding="utf-8"), jinja.name, special)
        except UnicodeDecodeError:
            raise CollapseError(f"{jinja.name} is not UTF-8 text") from None
    as_json = directory / "chat_template.json"
    if as_json.is_file():
        template = read_json_object(as_json, "chat template", 4 * MAX_CHAT_TEMPLATE_CHARS)
        validate_chat_template(template.get("chat_template"), as_json.name, special)


def _plain_names(value: Any, key: str, where: str, allow: tuple[str, ...] = ()) -> None:
    if value is None or value in allow:
        return
    if isinstance(value, str):
        raise CollapseError(
            f"{where}: {key} is the string {value[:40]!r}, which PEFT treats as a regular "
            f'expression; give a list of plain module names such as ["q_proj", "v_proj"]'
        )
    if (
        not isinstance(value, list)
        or len(value) > MAX_TARGET_MODULES
        or not all(isinstance(v, str) and len(v) <= 128 and _PLAIN_NAME.match(v) for v in value)
    ):
        raise CollapseError(
            f"{where}: {key} must be a list of at most {MAX_TARGET_MODULES} plain module names "
            '(letters, digits, "_" and "."), such as ["q_proj", "v_proj"]'
        )


def _bounded_int(value: Any, key: str, where: str, low: int, high: int) -> None:
    if type(value) is not int or not low <= value <= high:
        raise CollapseError(
            f"{where}: {key} = {str(value)[:40]} must be a whole number from {low} to {high}"
        )


def validate_adapter_config(
    config: dict[str, Any], where: str, shapes: dict[str, tuple[int, ...]] | None = None
) -> None:
    """Refuse LoRA adapter configs that could hang or exhaust the loader.

    ``r`` (and every ``rank_pattern`` value) must be 1 … :data:`MAX_LORA_RANK`; ``target_modules``,
    ``modules_to_save``, ``exclude_modules`` and pattern keys must be plain module names (PEFT
    runs a string ``target_modules`` as a regular expression against every module name);
    ``layer_replication`` (copies layers), Megatron, LoftQ and data-driven initialisations are
    refused. With ``shapes`` (the adapter's safetensors header), every ``lora_A`` rank is checked
    against the cap too.
    """
    if config.get("peft_type") != "LORA":
        raise CollapseError(
            f"{where} says peft_type {str(config.get('peft_type'))[:40]!r}; only LoRA adapters "
            "(peft_type LORA) are supported"
        )
    _bounded_int(config.get("r", 8), "r", where, 1, MAX_LORA_RANK)
    alpha = config.get("lora_alpha", 8)
    if type(alpha) not in (int, float) or not math.isfinite(alpha) or not 0 < abs(alpha) <= 1e6:
        raise CollapseError(f"{where}: lora_alpha = {str(alpha)[:40]} must be a finite number")
    _plain_names(config.get("target_modules"), "target_modules", where, allow=("all-linear",))
    for key in ("modules_to_save", "exclude_modules"):
        _plain_names(config.get(key), key, where)
    for key in ("rank_pattern", "alpha_pattern"):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict):
            raise CollapseError(f"{where}: {key} must be an object of module name → number")
        _plain_names(list(pattern), key, where)
        for value in pattern.values():
            if key == "rank_pattern":
                _bounded_int(value, key, where, 1, MAX_LORA_RANK)
            elif type(value) not in (int, float) or not math.isfinite(value):
                raise CollapseError(f"{where}: {key} values must be finite numbers")
    layers = config.get("layers_to_transform")
    if layers is not None:
        items = layers if isinstance(layers, list) else [layers]
        if len(items) > CONFIG_SIZE_CAPS["num_hidden_layers"]:
            raise CollapseError(f"{where}: layers_to_transform lists too many layers")
        for item in items:
            _bounded_int(
                item, "layers_to_transform", where, 0, CONFIG_SIZE_CAPS["num_hidden_layers"]
            )
    pattern = config.get("layers_pattern")
    _plain_names([pattern] if isinstance(pattern, str) else pattern, "layers_pattern", where)
    for key in ("layer_replication", "megatron_config", "loftq_config", "eva_config",
                "corda_config", "target_parameters", "trainable_token_indices"):  # fmt: skip
        if config.get(key):
            raise CollapseError(f"{where}: {key} is not supported for uploaded adapters; remove it")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool):
        raise CollapseError(
            f"{where}: init_lora_weights = {str(init)[:40]!r} would run a data- or SVD-based "
            "initialisation at load time; saved adapters need true or false"
        )
    for name, shape in (shapes or {}).items():
        if "lora_A" in name and shape and not 0 < shape[0] <= MAX_LORA_RANK:
            raise CollapseError(
                f"{where}: {name} has rank {shape[0]}, over the limit of {MAX_LORA_RANK}"
            )


class _TemplateTimeout(BaseException):
    """Raised from the trace hook; a BaseException so template code cannot swallow it."""


#: Wall-clock budget and output cap of one chat-template render during validation.
CHAT_TEMPLATE_RENDER_S = 2.0
MAX_RENDERED_CHARS = 1_000_000
_SAMPLE_CHAT = [
    {"role": "user", "content": "Explain, step by step, how to add two fractions. " * 20},
    {"role": "assistant", "content": "First find a common denominator. " * 10},
]


def render_chat_template_limited(template: str, where: str, special: dict[str, str]) -> None:
    """Render ``template`` as transformers would (sandboxed Jinja, ``loopcontrols``, ``tojson``,
    ``raise_exception``) on the conversations this project renders, with a wall-clock budget
    (:data:`CHAT_TEMPLATE_RENDER_S`, enforced by a trace hook on the template's compiled code),
    ``*``/``**`` results capped, and the output capped. Template errors are left to the loader;
    only a render that would hang or explode is refused."""
    import sys
    import time

    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Env(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context, operator, left, right):  # noqa: ANN001 - jinja's hook
            if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
                raise _TemplateTimeout("power")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                        if len(seq) * n > MAX_RENDERED_CHARS:
                            raise _TemplateTimeout("repeat")
            return super().call_binop(context, operator, left, right)

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    try:
        compiled = env.from_string(template)
    except TemplateError:
        return  # the loader reports syntax errors itself
    deadline = time.monotonic() + CHAT_TEMPLATE_RENDER_S

    def hook(frame, event, arg):  # noqa: ANN001 - sys.settrace signature
        if time.monotonic() > deadline:
            raise _TemplateTimeout("time")
        return hook

    previous = sys.gettrace()
    try:
        for messages, add in ((_SAMPLE_CHAT[:1], True), (_SAMPLE_CHAT, False)):
            sys.settrace(hook)
            try:
                text = compiled.render(messages=messages, add_generation_prompt=add, **special)
            except TemplateError:
                continue
            except (MemoryError, OverflowError):
                raise _TemplateTimeout("memory") from None
            finally:
                sys.settrace(previous)
            if len(text) > MAX_RENDERED_CHARS:
                raise _TemplateTimeout("output")
    except _TemplateTimeout as why:
        raise CollapseError(
            f"{where}: rendering the chat template {_WHY_TEMPLATE[str(why)]}; it is refused"
        ) from None


_WHY_TEMPLATE = {
    "time": f"took over {CHAT_TEMPLATE_RENDER_S:.0f} s for one short conversation (huge loops)",
    "power": "computes a huge power", "repeat": "repeats a string or list into a huge one",
    "memory": "ran out of memory", "output": f"produced over {MAX_RENDERED_CHARS:,} characters",
}  # fmt: skip


def validate_chat_template(
    template: Any, where: str, special: dict[str, str] | None = None
) -> None:
    """A chat template must be a string (or a list of named strings) under
    :data:`MAX_CHAT_TEMPLATE_CHARS` whose render stays in budget
    (:func:`render_chat_template_limited`)."""
    if template is None:
        return
    texts = [template] if isinstance(template, str) else None
    if isinstance(template, list) and all(
        isinstance(t, dict) and isinstance(t.get("template"), str) for t in template
    ):
        texts = [t["template"] for t in template]
    if texts is None:
        raise CollapseError(f"{where}: chat_template must be a string")
    if sum(len(t) for t in texts) > MAX_CHAT_TEMPLATE_CHARS:
        raise CollapseError(
            f"{where}: chat template is {sum(len(t) for t in texts):,} characters, over the "
            f"limit of {MAX_CHAT_TEMPLATE_CHARS:,}"
        )
    for text in texts:
        render_chat_template_limited(text, where, special or {})


# -- trial load --------------------------------------------------------------------------
TRIAL_CHILD_ENV = "COLLAPSE_TRIAL_CHILD"
TRIAL_MARKER = ".collapse_trial.json"


def _trial_limits(memory_mb: int):  # pragma: no cover - runs in the child
    import resource

    def apply() -> None:
        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _trial_stamp(paths: list[Path], base: str | None) -> list:
    files = sorted(f for p in paths for f in ([p] if p.is_file() else p.iterdir()) if f.is_file()
                   and f.name != TRIAL_MARKER)  # fmt: skip
    return [base, *[[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]]


def trial_load(
    spec: Path, base: str | None = None, allow_pickle: bool = False,
    timeout_s: float | None = None, memory_mb: int | None = None,
) -> None:  # fmt: skip
    """Load an untrusted model once in a child process (``python -m collapse_core.trial_load``)
    under an address-space limit (``RLIMIT_AS``) and a wall clock, so a hostile upload that
    passed the static checks (a chat template with huge loops, sizes that only blow up in the
    forward pass) cannot hang or exhaust the worker; raises a one-line :class:`CollapseError`.

    Limits: ``COLLAPSE_TRIAL_TIMEOUT_S`` (default 300 s) and ``COLLAPSE_TRIAL_MEMORY_MB``
    (default 4 GiB + 3 × the weights' size). A success is remembered in a marker file next to
    the weights (keyed by file names, sizes and mtimes), so each upload is tried once.
    """
    import os
    import signal
    import subprocess
    import sys

    from .paths import REPO_ROOT

    spec = Path(spec)
    marker = (spec if spec.is_dir() else spec.parent) / TRIAL_MARKER
    stamp = _trial_stamp([spec], base)
    try:
        if json.loads(marker.read_text()) == stamp:
            return
    except (OSError, ValueError):
        pass
    weights = sum(s[1] for s in stamp[1:])
    timeout = timeout_s or float(os.environ.get("COLLAPSE_TRIAL_TIMEOUT_S") or 300)
    memory = memory_mb or int(
        os.environ.get("COLLAPSE_TRIAL_MEMORY_MB") or 4096 + 3 * weights // (1 << 20)
    )
    args = json.dumps({"spec": str(spec), "base": base, "allow_pickle": allow_pickle})
    env = {**os.environ, TRIAL_CHILD_ENV: "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "collapse_core.trial_load", args], stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env=env,
        start_new_session=True, preexec_fn=_trial_limits(memory),  # noqa: PLW1509
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise CollapseError(
            f"{spec.name}: loading it took longer than {timeout:.0f} s in the trial worker "
            "(huge sizes or a chat template that loops?); refused (COLLAPSE_TRIAL_TIMEOUT_S "
            "raises the limit)"
        ) from None
    lines = out.decode("utf-8", errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except ValueError:
        result = {}
    if result.get("ok"):
        try:
            marker.write_text(json.dumps(stamp))
        except OSError:
            pass
        return
    error = result.get("error")
    if error and error != "memory" and result.get("kind") != "crash":
        raise CollapseError(error)
    if error and error != "memory":
        raise CollapseError(
            f"{spec.name}: the trial load failed ({error[:160]}); it may have needed more than "
            f"{memory:,} MB (COLLAPSE_TRIAL_MEMORY_MB raises the limit)"
        )
    raise CollapseError(
        f"{spec.name}: loading it needed more than {memory:,} MB in the trial worker "
        f"(exit status {proc.returncode}); refused (COLLAPSE_TRIAL_MEMORY_MB raises the limit)"
    )


def needs_trial(path: Path) -> bool:
    """True for files under the uploads folder, outside a trial child itself."""
    import os

    from .paths import data_dir

    if os.environ.get(TRIAL_CHILD_ENV):
        return False
    try:
        return Path(path).resolve().is_relative_to((data_dir() / "uploads").resolve())
    except OSError:
        return False


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
