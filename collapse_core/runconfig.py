"""Run configs: a TOML file describing a sequential post-training study.

Example (see ``configs/*.toml``)::

    [run]
    name = "demo"
    model = "smollm2"
    stages = ["sft", "dpo", "safety", "math", "code", "long_cot"]   # one order, or:
    # orders = [["sft", "math"], ["math", "sft"]]
    seeds = [0]
    data_source = "full"          # "sample": tiny in-repo data (tests)

    [train]   steps, batch_size, lr, lora_r, lora_alpha, target_modules, max_length, n_train
    [eval]    n_heldout, n_ood, plasticity_steps, plasticity_n, probe_sets, probe_max_prompts,
              generation_n (held-out HumanEval problems for greedy code pass@1; 0 = off),
              max_new_tokens
    [probe]   max_length, n_samples
    [interventions]  arms = ["baseline", "replay", ...] plus one table per arm with its settings

Validation turns every mistake into one line naming the key and the allowed values.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CollapseError
from .names import ARMS, STAGES

MAX_STEPS = 100_000


@dataclass
class RunConfig:
    """A validated run config (see module docstring for the file format)."""

    name: str
    model: str
    orders: list[list[str]]
    seeds: list[int]
    data_source: str = "full"
    device: str = "auto"
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)
    probe: dict[str, Any] = field(default_factory=dict)
    arms: list[str] = field(default_factory=lambda: ["baseline"])
    interventions: dict[str, dict[str, Any]] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict)


TRAIN_DEFAULTS: dict[str, Any] = {
    "steps": 30, "batch_size": 4, "lr": 2e-4, "lora_r": 8, "lora_alpha": 16,
    "target_modules": None, "max_length": 128, "n_train": 200, "dpo_beta": 0.1,
}  # fmt: skip
EVAL_DEFAULTS: dict[str, Any] = {
    "n_heldout": 16, "n_ood": 48, "plasticity_steps": 8, "plasticity_n": 32,
    "probe_sets": ["general", "math"], "probe_max_prompts": 64, "batch_size": 8,
    "heldout_domains": "all", "queue_embeddings": True, "generation_n": 0, "max_new_tokens": 256,
}  # fmt: skip
PROBE_DEFAULTS: dict[str, Any] = {"max_length": 64, "n_samples": 512, "batch_size": 16}


def _check_int(section: str, key: str, value: Any, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise CollapseError(f"[{section}] {key} = {value!r} must be a whole number in {lo}..{hi}")
    return value


def parse_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    """Validate a config dict (as read from TOML) into a :class:`RunConfig`."""
    run = raw.get("run")
    if not isinstance(run, dict):
        raise CollapseError(f"{where}: missing [run] table with name, model and stages")
    known_sections = {"run", "train", "eval", "probe", "interventions"}
    unknown = set(raw) - known_sections
    if unknown:
        raise CollapseError(
            f"{where}: unknown section [{sorted(unknown)[0]}]; use {sorted(known_sections)}"
        )
    if "orders" in run:
        orders = run["orders"]
    elif "stages" in run:
        orders = [run["stages"]]
    else:
        raise CollapseError(f"{where}: [run] needs stages = [...] or orders = [[...], ...]")
    if not isinstance(orders, list) or not orders:
        raise CollapseError(f"{where}: [run] orders must be a non-empty list of stage lists")
    for order in orders:
        if not isinstance(order, list) or not order:
            raise CollapseError(f"{where}: each stage order must be a non-empty list")
        for stage in order:
            if stage not in STAGES:
                raise CollapseError(
                    f"{where}: unknown stage {stage!r}; valid stages: {', '.join(STAGES)}"
                )
    seeds = run.get("seeds", [run.get("seed", 0)])
    if not isinstance(seeds, list) or not seeds:
        raise CollapseError(f"{where}: [run] seeds must be a non-empty list of integers")
    seeds = [_check_int("run", "seeds", s, 0, 2**31 - 1) for s in seeds]
    source = run.get("data_source", "full")
    if source not in ("full", "sample"):
        raise CollapseError(f"{where}: [run] data_source must be 'full' or 'sample'")
    train = {**TRAIN_DEFAULTS, **raw.get("train", {})}
    for key in set(raw.get("train", {})) - set(TRAIN_DEFAULTS):
        raise CollapseError(f"{where}: unknown key [train] {key}; known: {sorted(TRAIN_DEFAULTS)}")
    _check_int("train", "steps", train["steps"], 1, MAX_STEPS)
    _check_int("train", "batch_size", train["batch_size"], 1, 4096)
    _check_int("train", "lora_r", train["lora_r"], 1, 1024)
    _check_int("train", "max_length", train["max_length"], 8, 32768)
    _check_int("train", "n_train", train["n_train"], 1, 1_000_000)
    if not isinstance(train["lr"], (int, float)) or not 0 < train["lr"] < 1:
        raise CollapseError(f"{where}: [train] lr = {train['lr']!r} must be in (0, 1)")
    evals = {**EVAL_DEFAULTS, **raw.get("eval", {})}
    for key in set(raw.get("eval", {})) - set(EVAL_DEFAULTS):
        raise CollapseError(f"{where}: unknown key [eval] {key}; known: {sorted(EVAL_DEFAULTS)}")
    for key in ("n_heldout", "n_ood", "plasticity_steps", "plasticity_n", "probe_max_prompts"):
        _check_int("eval", key, evals[key], 0 if key != "probe_max_prompts" else 1, 100_000)
    _check_int("eval", "generation_n", evals["generation_n"], 0, 1_000)
    _check_int("eval", "max_new_tokens", evals["max_new_tokens"], 1, 8192)
    probe = {**PROBE_DEFAULTS, **raw.get("probe", {})}
    interventions = dict(raw.get("interventions", {}))
    arms = interventions.pop("arms", ["baseline"])
    if not isinstance(arms, list) or not arms:
        raise CollapseError(f"{where}: [interventions] arms must be a non-empty list")
    for arm in arms:
        parts = arm.split("+")
        for part in parts:
            if part not in ARMS:
                raise CollapseError(
                    f"{where}: unknown intervention {part!r}; valid: {', '.join(ARMS)} "
                    "(combine with +, e.g. replay+olora)"
                )
    for name in interventions:
        if name not in ARMS:
            raise CollapseError(
                f"{where}: unknown intervention table [interventions.{name}]; valid: "
                f"{', '.join(ARMS[1:])}"
            )
    return RunConfig(
        name=str(run.get("name", "run")),
        model=str(run.get("model", "smollm2")),
        orders=orders,
        seeds=seeds,
        data_source=source,
        device=str(run.get("device", "auto")),
        train=train,
        eval=evals,
        probe=probe,
        arms=arms,
        interventions=interventions,
        raw=raw,
    )


def load_config(path: str | Path, arms: list[str] | None = None) -> RunConfig:
    """Read and validate a TOML run config; ``arms`` overrides ``[interventions] arms``."""
    path = Path(path)
    if not path.exists():
        raise CollapseError(f"config {path} not found; see configs/ for examples")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise CollapseError(f"config {path} is not UTF-8 text") from err
    except tomllib.TOMLDecodeError as err:
        raise CollapseError(f"config {path} is not valid TOML: {err}") from err
    if arms is not None:
        raw.setdefault("interventions", {})["arms"] = arms
    return parse_config(raw, where=path.name)
