"""Run configs: a TOML file describing a sequential post-training study.

Example (see ``configs/*.toml``)::

    [run]
    name = "demo"
    model = "smollm2"
    stages = ["sft", "dpo", "safety", "math", "code", "long_cot"]   # one order, or:
    # orders = [["sft", "math"], ["math", "sft"]]
    seeds = [0]
    data_source = "full"          # "sample": tiny in-repo data (tests)

    [train]   method ("lora" | "full"), steps, batch_size, lr, lora_r, lora_alpha,
              target_modules, max_length, n_train, dpo_beta   (TrainSection, train/loop.py)
    [eval]    n_heldout, n_ood, plasticity_steps, plasticity_n, probe_sets, probe_max_prompts,
              batch_size, heldout_domains, queue_embeddings,
              generation_n (held-out HumanEval problems for greedy code pass@1; 0 = off),
              max_new_tokens                             (EvalSection, here)
    [probe]   max_length, n_samples, batch_size, lens_samples (ProbeSection, probing.py)
    [interventions]  arms = ["baseline", "replay", ...] plus one table per intervention with its
              settings (ReplaySettings, RefreshSettings, ... in interventions/)

Every section is a typed dataclass read by :func:`collapse_core.sections.from_table`: an unknown
key names the nearest valid one (``unknown key [probe] n_sample; did you mean n_samples?``),
types come from the annotations (no bool for a number, no string for a list), NaN/inf and
out-of-range values are refused, all as one line and before anything is written.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from .errors import CollapseError
from .names import ARMS, STAGES
from .probe_settings import PROBE_LIMITS
from .sections import Range, config_keys, from_table, suggest

if TYPE_CHECKING:
    from .probing import ProbeSection
    from .train.loop import TrainSection

MAX_STEPS = 100_000
MAX_RUNS = 1_000  # orders × seeds × arms of one study
SECTIONS = ("run", "train", "eval", "probe", "interventions")
_DEVICE = re.compile(r"(auto|cpu|mps|cuda(:\d{1,2})?)")
_SEED = Range(0, 2**31 - 1)


@dataclass
class RunSection:
    """The ``[run]`` table: what to train (``stages`` or ``orders``), on which data and seeds."""

    name: str = "run"
    model: str = "smollm2"
    stages: list[str] | None = None
    orders: list[list[str]] | None = None
    seeds: list[int] | None = None
    seed: int | None = None
    data_source: Literal["full", "sample"] = "full"
    device: str = "auto"
    keep_all: bool = False  # keep every stage's merged weights, not only the last

    LIMITS: ClassVar[dict[str, Range]] = {"seeds": _SEED, "seed": _SEED}
    NON_EMPTY: ClassVar[tuple[str, ...]] = ("name", "model", "stages", "orders", "seeds")


@dataclass
class EvalSection:
    """The ``[eval]`` table: held-out, OOD, plasticity and generation evals of every checkpoint
    (0 switches an eval off), and which probe sets every checkpoint is probed on."""

    n_heldout: int = 16
    n_ood: int = 48
    plasticity_steps: int = 8
    plasticity_n: int = 32
    probe_sets: list[str] = field(default_factory=lambda: ["general", "math"])
    probe_max_prompts: int = 64
    batch_size: int = 8
    heldout_domains: Literal["all", "order"] = "all"
    queue_embeddings: bool = True
    generation_n: int = 0
    max_new_tokens: int = 256

    LIMITS: ClassVar[dict[str, Range]] = {
        "n_heldout": Range(0, 100_000), "n_ood": Range(0, 100_000),
        "plasticity_steps": Range(0, MAX_STEPS), "plasticity_n": Range(1, 100_000),
        "probe_max_prompts": PROBE_LIMITS["max_prompts"], "batch_size": Range(1, 4096),
        "generation_n": Range(0, 1_000), "max_new_tokens": Range(1, 8192),
    }  # fmt: skip
    NON_EMPTY: ClassVar[tuple[str, ...]] = ("probe_sets",)


@dataclass
class RunConfig:
    """A validated run config (see module docstring for the file format)."""

    name: str
    model: str
    orders: list[list[str]]
    seeds: list[int]
    data_source: str = "full"
    device: str = "auto"
    train: TrainSection = None  # type: ignore[assignment]  # filled by parse_config
    eval: EvalSection = field(default_factory=EvalSection)
    probe: ProbeSection = None  # type: ignore[assignment]  # filled by parse_config
    arms: list[str] = field(default_factory=lambda: ["baseline"])
    interventions: dict[str, Any] = field(default_factory=dict)  # name -> its Settings
    raw: dict[str, Any] = field(default_factory=dict)
    keep_all: bool = False  # [run] keep_all: keep every stage's merged weights


def _check_stages(orders: list[list[str]], where: str) -> None:
    for order in orders:
        for stage in order:
            if stage not in STAGES:
                raise CollapseError(
                    f"{where}: unknown stage {stage!r}{suggest(stage, STAGES)} "
                    f"(valid stages: {', '.join(STAGES)})"
                )


def _check_probe_sets(names: list[str], where: str) -> None:
    from .probesets import list_probe_sets

    builtin = list_probe_sets()
    for name in names:
        if name not in builtin and not Path(name).expanduser().is_file():
            raise CollapseError(
                f"{where}: [eval] probe_sets: unknown probe set {name!r}{suggest(name, builtin)} "
                f"(built-in: {', '.join(builtin)}, or a .txt/.jsonl file path)"
            )


def _parse_arms(interventions: Any, where: str) -> tuple[list[str], dict[str, Any]]:
    """``[interventions]``: the arms and each intervention's typed settings."""
    from .interventions import REGISTRY

    if interventions is None:
        interventions = {}
    if not isinstance(interventions, dict):
        raise CollapseError(f"{where}: [interventions] must be a table")
    tables = dict(interventions)
    arms = tables.pop("arms", ["baseline"])
    if not isinstance(arms, list) or not arms or not all(isinstance(a, str) for a in arms):
        raise CollapseError(
            f"{where}: [interventions] arms = {arms!r} must be a non-empty list of names, "
            'e.g. ["baseline", "replay"]'
        )
    for arm in arms:
        for part in arm.split("+"):
            if part not in ARMS:
                raise CollapseError(
                    f"{where}: unknown intervention {part!r}{suggest(part, ARMS)} "
                    f"(valid: {', '.join(ARMS)}; combine with +, e.g. replay+olora)"
                )
    if len(set(arms)) != len(arms):
        raise CollapseError(f"{where}: [interventions] arms lists an arm twice: {arms}")
    settings = {}
    for name, table in tables.items():
        if name not in REGISTRY:
            raise CollapseError(
                f"{where}: unknown intervention table [interventions.{name}]"
                f"{suggest(name, REGISTRY)} (valid: {', '.join(REGISTRY)}, and arms)"
            )
        settings[name] = REGISTRY[name].parse_settings(table, where)
    return arms, settings


def _check_arms_fit_method(arms: list[str], method: str, where: str) -> None:
    """Interventions on LoRA adapters (``lora_only``, e.g. O-LoRA) need LoRA stages."""
    from .interventions import REGISTRY

    if method == "lora":
        return
    for arm in arms:
        for part in arm.split("+"):
            if part in REGISTRY and REGISTRY[part].lora_only:
                raise CollapseError(
                    f"{where}: intervention {part!r} (arm {arm!r}) acts on LoRA adapters, but "
                    f'[train] method = "{method}" trains none; drop the arm or use '
                    'method = "lora"'
                )


def parse_config(raw: dict[str, Any], where: str = "config") -> RunConfig:
    """Validate a config dict (as read from TOML) into a :class:`RunConfig`.

    Every section is a typed dataclass (:class:`RunSection`, :class:`EvalSection`,
    :class:`~collapse_core.train.loop.TrainSection`,
    :class:`~collapse_core.probing.ProbeSection`, one ``Settings`` per intervention) that refuses
    unknown keys (naming the nearest), wrong types, NaN/inf and out-of-range values
    (:func:`collapse_core.sections.from_table`); nothing is written before this returns.
    """
    from .probing import ProbeSection
    from .train.loop import TrainSection

    if not isinstance(raw, dict):
        raise CollapseError(f"{where}: a run config must be a table with [run], [train], ...")
    if not isinstance(raw.get("run"), dict):
        raise CollapseError(f"{where}: missing [run] table with name, model and stages")
    for section in raw:
        if section not in SECTIONS:
            raise CollapseError(
                f"{where}: unknown section [{section}]{suggest(section, SECTIONS)} "
                f"(valid: {', '.join(SECTIONS)})"
            )
    classes = {"run": RunSection, "train": TrainSection, "eval": EvalSection,
               "probe": ProbeSection}  # fmt: skip
    keys = {name: config_keys(cls) for name, cls in classes.items()}

    def section(name: str) -> Any:
        others = {other: k for other, k in keys.items() if other != name}
        return from_table(classes[name], raw.get(name), name, where, elsewhere=others)

    run = section("run")
    if run.orders is not None and run.stages is not None:
        raise CollapseError(f"{where}: [run] has both stages and orders; keep one")
    if run.orders is None and run.stages is None:
        raise CollapseError(f"{where}: [run] needs stages = [...] or orders = [[...], ...]")
    orders = run.orders if run.orders is not None else [run.stages]
    if any(not order for order in orders):
        raise CollapseError(f"{where}: [run] each stage order must be a non-empty list")
    _check_stages(orders, where)
    if run.seeds is not None and run.seed is not None:
        raise CollapseError(f"{where}: [run] has both seed and seeds; keep one")
    seeds = run.seeds if run.seeds is not None else [run.seed or 0]
    if not run.name.strip():
        raise CollapseError(f"{where}: [run] name must not be blank")
    if not _DEVICE.fullmatch(run.device):
        raise CollapseError(
            f"{where}: [run] device = {run.device!r} is not a device; use auto, cpu, cuda, "
            "cuda:N or mps"
        )
    train = section("train")
    evals = section("eval")
    _check_probe_sets(evals.probe_sets, where)
    probe = section("probe")
    arms, interventions = _parse_arms(raw.get("interventions"), where)
    _check_arms_fit_method(arms, train.method, where)
    n_runs = len(orders) * len(seeds) * len(arms)
    if n_runs > MAX_RUNS:
        raise CollapseError(
            f"{where}: {len(orders)} orders × {len(seeds)} seeds × {len(arms)} arms = {n_runs} "
            f"runs; at most {MAX_RUNS} per study"
        )
    return RunConfig(
        name=run.name,
        model=run.model,
        orders=[list(order) for order in orders],
        seeds=list(seeds),
        data_source=run.data_source,
        device=run.device,
        train=train,
        eval=evals,
        probe=probe,
        arms=arms,
        interventions=interventions,
        raw=raw,
        keep_all=run.keep_all,
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
