"""Command line: ``python -m collapse_core {probe,run,track,ingest,analyze,worker,bench} ...``.

Every user-facing failure is a :class:`~collapse_core.errors.CollapseError` printed as one line
(``error: ...``) with exit status 2; nothing else is caught, so real bugs still show a traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .errors import CollapseError

SUMMARY_COLUMNS = [
    ("effective_rank", "erank", "{:.1f}"),
    ("stable_rank", "srank", "{:.2f}"),
    ("participation_ratio", "PR", "{:.1f}"),
    ("alpha_req", "alpha", "{:.2f}"),
    ("anisotropy_cosine", "aniso", "{:.3f}"),
    ("top_pc_share", "topPC", "{:.3f}"),
    ("twonn_dimension", "TwoNN", "{:.1f}"),
    ("homogeneity_gap", "homog", "{:.3f}"),
    ("dormant_fraction", "dormant", "{:.3f}"),
    ("logit_lens_entropy", "lensH", "{:.2f}"),
]


def format_layer_table(wide) -> str:
    """A fixed-width per-layer summary of a probe's wide metrics frame."""
    cols = [c for c in SUMMARY_COLUMNS if c[0] in wide.columns]
    header = "layer " + " ".join(f"{short:>8}" for _, short, _ in cols)
    lines = [header, "-" * len(header)]
    for layer, row in wide.iterrows():
        cells = []
        for name, _, fmt in cols:
            value = row.get(name)
            cells.append(f"{'-' if value != value or value is None else fmt.format(value):>8}")
        lines.append(f"{int(layer):>5} " + " ".join(cells))
    return "\n".join(lines)


def tqdm_progress(desc: str) -> tuple[Callable[[int, int], None], Callable[[], None]]:
    """A ``progress(done, total)`` callback drawing a tqdm bar, and a closer."""
    from tqdm import tqdm

    bar: dict = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
        bar["bar"].n = done
        bar["bar"].refresh()

    def close() -> None:
        if "bar" in bar:
            bar["bar"].close()

    return progress, close


def _print_probe(store, probe_key: str, probe_set: str, status: str) -> None:
    """One probe's per-layer table (read back from the store, as every executor stored it)."""
    long = store.layer_metrics(probe_key)
    wide = long.pivot(index="layer", columns="metric", values="value")
    print(f"\nprobe set {probe_set} · probe {probe_key} · {status}")
    print(format_layer_table(wide))
    if "next_token_entropy" in wide.columns:
        last = wide.iloc[-1]
        print(f"next-token entropy {last['next_token_entropy']:.3f} nats, "
              f"top-1 margin {last['top1_margin']:.3f}")  # fmt: skip


def open_store(args: argparse.Namespace, writes: bool = True, must_exist: bool = False):
    """The command's Store (``--db`` or ``$COLLAPSE_DB``). Under ``COLLAPSE_READONLY=1`` a command
    that writes is refused and a reading one opens the file read-only; ``must_exist`` (commands
    that only make sense on stored results) refuses a missing file instead of creating it, so a
    mistyped ``--db`` is an error, never a new empty database."""
    from pathlib import Path

    from .paths import default_db_path, env_flag
    from .store import Store

    path = Path(args.db) if args.db else default_db_path()
    if env_flag("COLLAPSE_READONLY"):
        if writes:
            raise CollapseError(
                f"COLLAPSE_READONLY is set and `{args.command}` writes to the database; unset "
                "it to run this command"
            )
        must_exist = True
    if (must_exist or not writes) and not path.is_file():
        raise CollapseError(
            f"database {path} not found; check --db / COLLAPSE_DB (`{args.command}` reads "
            "stored results and never creates a database)"
        )
    return Store(path, read_only=not writes)


def cmd_probe(args: argparse.Namespace) -> int:
    from .probesets import load_probe_set

    config = probe_config_from_args(args, seed=args.seed)
    models = [*args.models, *(args.model_option or [])] or ["smollm2"]
    # A mistyped set fails in a second, before the database is opened or a model loads.
    probe_sets = [load_probe_set(name) for name in args.probe_set]
    store = open_store(args)
    if args.executor == "ray":
        _probe_on_ray(args, models, config, store)
    else:
        for spec in models:
            _probe_here(args, spec, probe_sets, config, store)
    print(f"\nstored in {store.path}")
    return 0


def _probe_here(args: argparse.Namespace, spec: str, probe_sets: list, config, store) -> None:
    from .models import load_model
    from .probing import probe

    loaded = load_model(spec, args.base, args.device, allow_pickle=args.allow_pickle)
    print(f"\nmodel {loaded.name}: {loaded.architecture}, {loaded.n_layers} layers, "
          f"d={loaded.d_model}, {loaded.n_params / 1e6:.1f}M params, checkpoint "
          f"{loaded.checkpoint_id}, device {loaded.device}")  # fmt: skip
    for probe_set in probe_sets:
        progress, close = tqdm_progress(f"probe {probe_set.name}")
        try:
            result = probe(loaded, probe_set, config, store=store, progress=progress,
                           force=args.force)  # fmt: skip
        finally:
            close()
        status = "cache hit (no forward pass)" if result.cached else f"{result.seconds:.1f} s"
        _print_probe(store, result.probe_key, result.probe_set, status)


def _probe_on_ray(args: argparse.Namespace, models: list[str], config, store) -> None:
    import time

    from .distributed import probe_models_ray

    started = time.perf_counter()
    done = probe_models_ray(models, args.probe_set, config, store, base=args.base,
                            device=args.device, allow_pickle=args.allow_pickle, force=args.force,
                            results_dir=args.results, address=args.address, log=print,
                            max_retries=args.max_retries)  # fmt: skip
    for model in done:
        print(f"\nmodel {model['summary']}")
        for p in model["probes"]:
            status = ("cache hit (no forward pass)" if model["cached"]
                      else f"{p['seconds']:.1f} s on Ray")  # fmt: skip
            _print_probe(store, p["probe_key"], p["probe_set"], status)
    print(f"\n{len(done)} model(s) in {time.perf_counter() - started:.1f} s")


def cmd_run(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from .pipeline import run_study
    from .runconfig import load_config

    arms = None
    if args.compare is not None:
        arms = [a.strip() for a in args.compare.split(",") if a.strip()]
        if not arms:
            raise CollapseError(
                f"--compare {args.compare!r} names no arm; give arm names separated by commas "
                "(e.g. --compare baseline,replay), or leave it out to run the whole config"
            )
    config = load_config(args.config, arms=arms)
    if args.model:
        config.model = args.model
        config.raw.setdefault("run", {})["model"] = args.model
    store = open_store(args)
    _reap_and_trap_sigterm(store)
    bar = tqdm(total=1000, desc=config.name, unit="‰", file=sys.stderr,
               bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")  # fmt: skip
    started = time.perf_counter()

    def progress(fraction: float, message: str) -> None:
        bar.n = int(fraction * 1000)
        bar.set_postfix_str(message[:60], refresh=True)

    def log(line: str) -> None:
        bar.write(line)

    try:
        if args.executor == "ray":
            from .distributed import run_study_ray

            study_id = run_study_ray(config, store, args.results, args.address, progress=progress,
                                     log=log, max_retries=args.max_retries)  # fmt: skip
        else:
            study_id = run_study(config, store, progress=progress, log=log)
    finally:
        bar.close()
    print(
        f"study {study_id} finished in {time.perf_counter() - started:.0f} s; stored in {store.path}"
    )
    from .analysis import stage_table_text

    print(stage_table_text(store, study_id))
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from .segments import find_segments, folder_bytes, ingest_folder

    find_segments(args.folder)  # a mistyped folder fails before the database is created
    store = open_store(args)
    before = store.path.stat().st_size
    report = ingest_folder(store, args.folder)
    print(f"{report.summary()}; results folder {folder_bytes(args.folder) / 1e6:.2f} MB; "
          f"{store.path} {before / 1e6:.2f} -> {store.path.stat().st_size / 1e6:.2f} MB")  # fmt: skip
    return 0


def _reap_and_trap_sigterm(store) -> None:
    """Before a run: mark runs and jobs whose process died ``interrupted``, and make SIGTERM
    end this process like Ctrl-C (so its run is recorded ``interrupted``, not left running)."""
    import signal

    from .jobs.worker import reap_interrupted

    reap_interrupted(store)

    def terminated(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)


def cmd_analyze(args: argparse.Namespace) -> int:
    from .analysis import arm_comparison_text, compare_arms, resolve_study, stage_table_text
    from .catalog import latest_probes, stage_catalog
    from .hypothesis import analyze_study, verdict_text
    from .uncertainty import store_cis

    store = open_store(args, must_exist=True)
    study_id = resolve_study(store, args.study)
    print(f"study {study_id}\n")
    print(stage_table_text(store, study_id))
    if args.ci_boot:
        keys = latest_probes(store, list(stage_catalog(store, study_id=study_id)["checkpoint_id"]))
        done = store_cis(store, list(keys["probe_key"]), args.ci_boot, log=print)
        print(f"per-layer CIs: {done} probe(s) computed, {len(keys) - done} already stored\n")
        from . import views
        from .analysis import fixed_width

        changes = views.stage_changes(store, study_id)
        if not changes.empty:
            print("stage-to-stage changes (probe set general; mid and last layer):")
            print(fixed_width(changes))
            print(f"{views.STAGE_CHANGE_NOTE}\n")
    tests = analyze_study(store, study_id, n_boot=args.n_boot, n_perm=args.n_perm)
    layer = None if args.layer == "all" else args.layer
    print(f"\nhypothesis tests (layer position = {args.layer}; stored in hypothesis_tests):")
    print(verdict_text(tests, layer))
    comparison = compare_arms(store, study_id, n_boot=args.n_boot)
    if not comparison.empty:
        print("\nintervention arms vs baseline (arm - baseline):")
        print(arm_comparison_text(comparison))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .analysis import resolve_study
    from .report import write_report

    store = open_store(args, writes=False)
    study = resolve_study(store, args.study) if args.study is not None else None
    return write_report(store, study, args.out, args.tables)


def cmd_worker(args: argparse.Namespace) -> int:
    from .jobs.worker import run_worker

    store = open_store(args)
    print(f"worker {__import__('os').getpid()} on {store.path}", flush=True)
    run_worker(store, exit_when_idle=args.exit_when_idle)
    return 0


def cmd_track(args: argparse.Namespace) -> int:
    import time

    from .track import TrackSettings, series_entries, track, watch

    config = probe_config_from_args(args)
    settings = TrackSettings(probe_sets=tuple(args.probe_set), probe=config, base=args.base,
                             evaluate=args.eval, data_source=args.data_source,
                             device=args.device)  # fmt: skip
    if args.executor == "ray" and args.watch:
        raise CollapseError("--watch polls from this process; use --executor local with it")
    # Settings, paths and shapes are checked before the database is opened (or created).
    entries = None if args.watch else series_entries(args.paths, args.base)
    store = open_store(args)
    started = time.perf_counter()
    if args.executor == "ray":
        from .distributed import track_ray

        print(f"series {args.name}: {len(entries)} checkpoints")
        stages = track_ray(entries, args.name, store, settings, args.results, args.address,
                           log=print, max_retries=args.max_retries)  # fmt: skip
    elif args.watch:
        print(f"watching {', '.join(args.paths)} every {args.poll:.0f} s (Ctrl-C to stop)")
        try:
            stages = watch(args.paths, args.name, store, settings, args.poll, args.max_polls,
                           log=print)  # fmt: skip
        except KeyboardInterrupt:
            print("stopped watching; every committed stage is kept")
            return 0
    else:
        print(f"series {args.name}: {len(entries)} checkpoints")
        stages = track(entries, args.name, store, settings, log=print)
    hits = sum(s.cached for s in stages)
    print(f"tracked {len(stages)} checkpoints ({hits} cache hits) in "
          f"{time.perf_counter() - started:.1f} s; stored in {store.path}")  # fmt: skip
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "lens":  # a study that uses bench's helpers: bench must not import it
        from .devtools.bench_lens import bench_lens

        return bench_lens(args)
    from .devtools import bench

    return bench.main(args)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` ends an option's text with its default unless the text already names one or
    the default means "not given" (None, False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default in (None, False, [], "", argparse.SUPPRESS)
                or not action.option_strings):  # fmt: skip
            return text
        return f"{text} (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad argument as one ``error: ...`` line (exit status 2), like
    every other user-facing failure, instead of a usage block; ``--help`` shows defaults."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog.removeprefix('python -m collapse_core ')}: {message} "
                     f"(see --help)\n")  # fmt: skip


def whole_number(low: int, high: int = 10**9, allow_zero: bool = False) -> Callable[[str], int]:
    """An argparse ``type``: a whole number in [low, high] (or 0 with ``allow_zero``: "skip"),
    else a one-line usage error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if not (low <= value <= high or (allow_zero and value == 0)):
            zero = "0 or " if allow_zero else ""
            raise argparse.ArgumentTypeError(f"{value} must be {zero}between {low} and {high:,}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """An argparse ``type``: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be a positive number of seconds")
    return value


def add_probe_size_arguments(parser: argparse.ArgumentParser) -> None:
    """--batch-size, --max-length, --n-samples, --max-prompts, --lens-samples (probe and track
    share them; :func:`probe_config_from_args` reads them): defaults, limits and help from
    :mod:`collapse_core.probe_settings`."""
    from .probe_settings import PROBE_DEFAULTS, PROBE_HELP, PROBE_LIMITS

    for name in ("batch_size", "max_length", "n_samples", "max_prompts", "lens_samples"):
        limit = PROBE_LIMITS[name]
        parser.add_argument(f"--{name.replace('_', '-')}", default=PROBE_DEFAULTS[name],
                            type=whole_number(int(limit.lo), int(limit.hi)),
                            help=PROBE_HELP[name])  # fmt: skip


def probe_config_from_args(args: argparse.Namespace, **extra):
    """The :class:`~collapse_core.probing.ProbeConfig` of :func:`add_probe_size_arguments`."""
    from .probing import ProbeConfig

    return ProbeConfig(max_length=args.max_length, batch_size=args.batch_size,
                       n_samples=args.n_samples, max_prompts=args.max_prompts,
                       lens_samples=args.lens_samples, **extra)  # fmt: skip


DB_HELP = "DuckDB file (default $COLLAPSE_DB or data/collapse.duckdb)"


def add_executor_arguments(parser: argparse.ArgumentParser, unit: str) -> None:
    """--executor, --address, --results, --max-retries (run, track and probe share them);
    ``unit`` says what one Ray task is (a run, a checkpoint)."""
    parser.add_argument("--executor", choices=["local", "ray"], default="local",
                        help=f"local: one after another in this process; ray: one Ray task per "
                        f"{unit}")  # fmt: skip
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (auto, host:6379 or ray://host:10001); "
                        "default: start a local one")  # fmt: skip
    parser.add_argument("--results", default=None,
                        help="folder for the Ray workers' segments, shared by all nodes "
                        "(default data/results)")  # fmt: skip
    parser.add_argument("--max-retries", type=whole_number(0, 100), default=3,
                        help="Ray: retries of a lost worker")  # fmt: skip


def _add_probe(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="probe checkpoints and store per-layer collapse metrics")
    model_help = ("`smollm2` (bundled default), `tiny-random`, a Hugging Face model folder, a "
                  ".gguf file, or a LoRA adapter folder (then also --base)")  # fmt: skip
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help=f"models to probe, each {model_help}")  # fmt: skip
    p.add_argument("--model", action="append", default=None, dest="model_option", metavar="MODEL",
                   help="a model to probe (same forms as MODEL; repeatable)")  # fmt: skip
    p.add_argument("--base", default=None, help="base model of LoRA adapters (any MODEL form)")
    p.add_argument("--probe-set", action="append", default=None,
                   help="built-in probe set name (general, math, code, refusal, mixed) or a "
                   ".txt/.jsonl file; repeat for several (default: general)")  # fmt: skip
    p.add_argument("--db", default=None, help=DB_HELP)
    p.add_argument("--device", default="auto", help="auto (cuda if present), cpu or cuda")
    add_probe_size_arguments(p)
    p.add_argument("--seed", type=whole_number(0, 2**32 - 1), default=0,
                   help="seed of the token subsample")  # fmt: skip
    p.add_argument("--force", action="store_true", help="recompute even if cached")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow .bin/.pt weights (loaded with torch.load(weights_only=True) "
                   "only)")  # fmt: skip
    add_executor_arguments(p, "model")
    p.set_defaults(func=cmd_probe)


def _add_run(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser("run", help="run a sequential post-training study from a TOML config")
    r.add_argument("config", help="run config, e.g. configs/demo.toml")
    r.add_argument("--db", default=None, help=DB_HELP)
    r.add_argument("--model", default=None, help="override [run] model")
    r.add_argument("--compare", default=None,
                   help="comma-separated arms to run as one study, e.g. "
                   "baseline,replay,refresh,diversity,olora")  # fmt: skip
    add_executor_arguments(r, "(order, seed, arm) run")
    r.set_defaults(func=cmd_run)


def _add_ingest(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("ingest", help="merge result segments (Ray workers') into the DB")
    g.add_argument("folder", help="results folder holding the workers' segments")
    g.add_argument("--db", default=None, help=DB_HELP)
    g.set_defaults(func=cmd_ingest)


def _add_analyze(sub: argparse._SubParsersAction) -> None:
    a = sub.add_parser("analyze", help="hypothesis test + intervention comparison of a study")
    a.add_argument("study", nargs="?", default="latest", help="study id or name, or `latest`")
    a.add_argument("--db", default=None, help=DB_HELP)
    a.add_argument("--layer", default="mean", choices=["mean", "mid", "last", "all"],
                   help="layer position of the verdicts printed (all are stored)")  # fmt: skip
    # Fewer than 20 replicates cannot give a 95 % interval, fewer than 19 permutations cannot
    # give p < 0.05 (the smallest p is 1 / (n_perm + 1)).
    a.add_argument("--n-boot", type=whole_number(20, 100_000), default=1000,
                   help="cluster-bootstrap replicates (20 to 100,000; default 1000)")  # fmt: skip
    a.add_argument("--n-perm", type=whole_number(19, 1_000_000), default=2000,
                   help="within-stage permutations (19 to 1,000,000; default 2000)")  # fmt: skip
    a.add_argument("--ci-boot", type=whole_number(20, 100_000, allow_zero=True), default=100,
                   help="prompt-bootstrap replicates for per-layer CIs (0 = skip, else 20 to "
                        "100,000; default 100; stored CIs with another count are recomputed)")  # fmt: skip
    a.set_defaults(func=cmd_analyze)


def _add_report(sub: argparse._SubParsersAction) -> None:
    rp = sub.add_parser(
        "report", help="export a study (or the standalone checkpoints) as offline HTML + tables"
    )
    rp.add_argument("--study", default=None,
                    help="study id, or `latest` (default: standalone checkpoints)")  # fmt: skip
    rp.add_argument("--out", default=None, help="output folder (default data/reports)")
    rp.add_argument("--db", default=None, help=DB_HELP)
    rp.add_argument("--tables", choices=["csv", "parquet", "none"], default="csv",
                    help="also write the study's tables as csv (default) or parquet, or none")  # fmt: skip
    rp.set_defaults(func=cmd_report)


def _add_worker(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("worker", help="run queued jobs (probes, pipelines) from the database")
    w.add_argument("--db", default=None, help=DB_HELP)
    w.add_argument("--exit-when-idle", type=positive_seconds, default=None,
                   help="exit after this many idle seconds")  # fmt: skip
    w.set_defaults(func=cmd_worker)


def _add_track(sub: argparse._SubParsersAction) -> None:
    t = sub.add_parser("track", help="track your own run: a checkpoint series as a study")
    t.add_argument("paths", nargs="+", metavar="PATH",
                   help="folder of checkpoint-<step> folders, model/adapter folders, .gguf, or a "
                   ".toml of label = \"path\" lines")  # fmt: skip
    t.add_argument("--name", required=True, help="study name (re-tracking it resumes the series)")
    t.add_argument("--base", default=None, help="base model (stage 0; needed for LoRA adapters)")
    t.add_argument("--eval", action="store_true",
                   help="also held-out/OOD/plasticity evals and weight-update metrics")  # fmt: skip
    t.add_argument("--watch", action="store_true", help="keep polling for new checkpoints")
    t.add_argument("--poll", type=positive_seconds, default=30.0,
                   help="watch: seconds between polls")  # fmt: skip
    t.add_argument("--max-polls", type=whole_number(1), default=None, help=argparse.SUPPRESS)
    t.add_argument("--probe-set", action="append", default=None,
                   help="probe set name or file; repeat for several (default: general)")  # fmt: skip
    t.add_argument("--data-source", default="full", choices=["full", "sample"],
                   help="eval data: full datasets or the tiny in-repo samples")  # fmt: skip
    t.add_argument("--db", default=None, help=DB_HELP)
    t.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_probe_size_arguments(t)
    add_executor_arguments(t, "checkpoint")
    t.set_defaults(func=cmd_track)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    positive = whole_number(1)
    b = sub.add_parser("bench", help="benchmarks that print side-by-side ratios")
    b.add_argument("what",
                   choices=["probe", "summary", "lens", "train", "app", "faults", "gpu", "ray"],
                   help="probe: probe vs forward vs naive; summary: the probe's summary on 1 vs "
                   "--threads threads; lens: two-phase logit-lens designs (cost, CI width) "
                   "against the exact lens; train: our LoRA loop vs HF Trainer; "
                   "app: page render times; faults: bad inputs and injected crashes; gpu: "
                   "SmolLM2 on CUDA (bf16, fp32, one training stage) against the CPU fp32 probe; "
                   "ray: a 4-run sweep local vs Ray (--model tiny for the tiny random model)")  # fmt: skip
    b.add_argument("--model", default="smollm2", help="model spec (default smollm2)")
    b.add_argument("--prompts", type=positive, default=64, help="probe bench: prompts")
    b.add_argument("--tokens", type=positive, default=64, help="tokens per prompt / max length")
    b.add_argument("--batch-size", type=positive, default=16, help="batch size")
    b.add_argument("--steps", type=positive, default=8, help="train bench: timed steps")
    b.add_argument("--repeats", type=positive, default=2, help="interleaved rounds (probe, train)")
    b.add_argument("--scaling", default="64x64,256x64,64x256",
                   help="probe bench: PROMPTSxTOKENS sizes of the scaling table ('' to skip)")  # fmt: skip
    b.add_argument("--threads", type=whole_number(0, 1024), default=0,
                   help="probe bench: torch threads (0 = default)")  # fmt: skip
    b.add_argument("--baseline", default=None,
                   help="probe bench: also run the probe of this checkout")  # fmt: skip
    b.add_argument("--device", default="auto", help="auto, cpu or cuda")
    b.add_argument("--workers", type=int, default=2, help="ray bench: CPUs of the local cluster")
    b.add_argument("--stages", type=int, default=2, help="ray bench: stages of quick.toml kept")
    b.set_defaults(func=cmd_bench)


COMMANDS = (_add_probe, _add_run, _add_ingest, _add_analyze, _add_report, _add_worker,
            _add_track, _add_bench)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree: one small ``_add_<command>`` function per subcommand."""
    parser = OneLineParser(
        prog="python -m collapse_core",
        description="Measure representation collapse in language models across post-training.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "probe_set", "unset") is None:
        args.probe_set = ["general"]
    try:
        return args.func(args)
    except CollapseError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        what = INTERRUPTED.get(args.command, "")
        print(f"interrupted; nothing partial was stored{what}", file=sys.stderr)
        return 130


#: What Ctrl-C leaves, per command (appended to "interrupted; nothing partial was stored").
INTERRUPTED = {
    "run": " (the run is marked interrupted and its committed stages are kept; run the same "
           "command again to resume)",
    "track": " (the series is marked interrupted and its committed stages are kept; track it "
             "again to resume)",
    "probe": " (probes that finished are kept; the same command again skips them as cache hits)",
}  # fmt: skip
