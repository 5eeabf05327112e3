"""The job kinds a worker can run, as one explicit table (:data:`HANDLERS`).

Each handler is thin: it calls the library with the job's progress and cancel hooks and returns
a small JSON-able result. The library is imported inside each handler so that a worker starts
fast and so that no compute module is needed to merely *list* the kinds.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import CollapseError
from ..sections import from_table
from ..store import Store
from .context import JobContext


def probe_job(spec: dict, ctx: JobContext, store: Store) -> dict:
    """Probe one model on one or more probe sets (spec: model, base, probe_sets, config, and an
    optional display name)."""
    from ..models import load_model
    from ..probesets import load_probe_set
    from ..probing import ProbeConfig, probe

    # Config and probe sets are checked before the model loads: a typo fails in a second.
    config = from_table(ProbeConfig, spec.get("config"), "config", "job spec")
    sets = [load_probe_set(name) for name in spec.get("probe_sets") or ["general"]]
    ctx.progress(0.0, f"loading {spec['model']}")
    loaded = load_model(spec["model"], spec.get("base"), spec.get("device", "auto"), verbose=False)
    if spec.get("name"):  # the name typed on upload wins over the file-based one
        from ..naming import clean_name

        loaded.name = clean_name(spec["name"])
    keys = []
    for i, probe_set in enumerate(sets):
        name = probe_set.name
        ctx.log(f"probing {loaded.name} on {name}")

        def progress(done: int, total: int, i: int = i, name: str = name) -> None:
            ctx.progress((i + done / total) / len(sets), f"{name}: {done}/{total}")

        result = probe(
            loaded, probe_set, config, store=store, progress=progress, should_stop=ctx.should_stop
        )
        keys.append(result.probe_key)
        if spec.get("name") and i == 0:  # weights probed before keep their row: rename it
            from ..naming import rename_checkpoint

            rename_checkpoint(store, loaded.checkpoint_id, loaded.name)
        ctx.log(f"{name}: {'cache hit' if result.cached else f'{result.seconds:.1f} s'}")
    return {"checkpoint_id": loaded.checkpoint_id, "probe_keys": keys}


def pipeline_job(spec: dict, ctx: JobContext, store: Store) -> dict:
    """Run (or resume) a study: spec has ``config`` (a TOML path) or ``config_dict``; with
    ``executor = "ray"`` (plus optional ``address``, ``results``) its runs are Ray tasks and this
    job is their driver (progress, ETA and cancel as for a local run)."""
    from ..pipeline import run_study
    from ..runconfig import load_config, parse_config

    arms = spec.get("arms")
    if "config_dict" in spec:
        raw = dict(spec["config_dict"])
        if arms:
            raw.setdefault("interventions", {})["arms"] = arms
        config = parse_config(raw, where="form")
    elif "config" in spec:
        config = load_config(spec["config"], arms=arms)
    else:
        raise CollapseError("pipeline job needs a config path or config_dict")
    if spec.get("executor") == "ray":
        from ..distributed import run_study_ray

        study_id = run_study_ray(config, store, spec.get("results"), spec.get("address"),
                                 progress=ctx.progress, log=ctx.log,
                                 should_stop=ctx.should_stop)  # fmt: skip
        return {"study_id": study_id}
    study_id = run_study(config, store, progress=ctx.progress, log=ctx.log,
                         should_stop=ctx.should_stop, job_id=ctx.job_id)  # fmt: skip
    return {"study_id": study_id}


def embedding_job(spec: dict, ctx: JobContext, store: Store) -> dict:
    """Compute (or find cached) a PCA/UMAP of stored token samples.

    Spec: ``{"key": embedding_key, "spec": EmbeddingSpec.to_dict()}`` (see
    :func:`collapse_core.embeddings.submit`); a repeat is a cache hit.
    """
    from ..embeddings import EmbeddingSpec, compute_embedding

    selection = EmbeddingSpec.from_dict(spec.get("spec") or spec)
    ctx.log(
        f"embedding ({selection.mode}, {selection.method}) of {', '.join(selection.probe_sets)}"
    )
    result = compute_embedding(store, selection, progress=ctx.progress, should_stop=ctx.should_stop)
    if spec.get("key") and result["embedding_key"] != spec["key"]:
        ctx.log("the probes changed since the job was queued; stored under the new key")
    ctx.log("cache hit" if result["cached"] else f"{result['tokens']} tokens embedded")
    return result


def track_job(spec: dict, ctx: JobContext, store: Store) -> dict:
    """Track a checkpoint series as one study (spec: name, entries [{label, path, step}] or
    paths, base, probe_sets, config, eval, data_source, device)."""
    from ..probing import ProbeConfig
    from ..track import SeriesEntry, TrackSettings, series_entries, track

    settings = TrackSettings(
        probe_sets=tuple(spec.get("probe_sets") or ["general"]),
        probe=from_table(ProbeConfig, spec.get("config"), "config", "job spec"), base=spec.get("base"),
        evaluate=bool(spec.get("eval")), data_source=spec.get("data_source", "full"),
        device=spec.get("device", "auto"),
    )  # fmt: skip
    if spec.get("entries"):
        entries = [SeriesEntry(e["label"], e["path"], e.get("step")) for e in spec["entries"]]
        if settings.base is not None:
            entries.insert(0, SeriesEntry("base", settings.base, 0))
    else:
        entries = series_entries(spec["paths"], settings.base)
    stages = track(entries, spec["name"], store, settings, progress=ctx.progress, log=ctx.log,
                   should_stop=ctx.should_stop)  # fmt: skip
    return {"name": spec["name"], "checkpoints": [s.checkpoint_id for s in stages],
            "cache_hits": sum(s.cached for s in stages)}  # fmt: skip


Handler = Callable[[dict, JobContext, Store], dict]

#: Job kind → handler. The only place a kind is defined.
HANDLERS: dict[str, Handler] = {
    "probe": probe_job,
    "pipeline": pipeline_job,
    "embedding": embedding_job,
    "track": track_job,
}
