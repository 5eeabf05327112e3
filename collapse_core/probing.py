"""Probe a checkpoint: the full collapse metric suite per layer, cached in DuckDB.

``probe(model, probe_set)`` is the one entry point (CLI, app and notebooks all call it). A result
is keyed by a content hash of (weights, probe-set texts, probe config, metric code version), so a
repeat is a cache hit that does no forward pass.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch

from . import metrics as M
from .batching import batch_tensors, plan_batches
from .capture import CAPTURE_VERSION, StreamingCapture
from .errors import Cancelled, CollapseError
from .lens import lens_design
from .models import LoadedModel, forward_accepts, load_model, model_parts
from .monitor import between_batches, raise_if_stopped
from .probe_settings import PROBE_DEFAULTS, PROBE_LIMITS
from .probesets import ProbeSet, load_probe_set
from .sections import Range, check_fields
from .store import Store, dumps, encode_vectors

ProgressFn = Callable[[int, int], None]

#: Progress steps of a probe after its last batch: the output-head pass over the subsample and
#: the lens tokens (:meth:`StreamingCapture.finish`), then the per-layer summary
#: (:func:`summarise`). On SmolLM2 at the default size each takes about as long as two batches,
#: so without their own ticks a progress bar would sit at 100 % for a few seconds.
STEPS_AFTER_BATCHES = 2


def probe_steps(n_batches: int) -> int:
    """Progress steps of one probe: one per forward batch (:func:`~collapse_core.batching.
    plan_batches`), plus :data:`STEPS_AFTER_BATCHES`."""
    return n_batches + STEPS_AFTER_BATCHES


@dataclass(frozen=True)
class ProbeConfig:
    """What a probe measures; every field is part of the cache key.

    ``drop_first`` skips position 0 of every prompt: the first token is an attention sink whose
    hidden state has an outsized norm (Xiao et al. 2023) and would dominate anisotropy.
    ``lens_samples``: the logit lens multiplies every layer's states by the (576 × 49152) LM head,
    so it runs on only ``lens_samples`` tokens of the fixed subsample, evenly spaced over it (so
    they come from all prompts, see :func:`lens_sample_index`), with the adaptive two-phase
    design of :mod:`collapse_core.lens`: the full head on 3/8 of them and a prefix-vocabulary
    proxy on twice as many tokens at every layer, the other lens tokens' full head rows only at
    the layers the proxy cannot help. As precise as the exact lens on ``lens_samples`` tokens at
    about half its cost (on SmolLM2 at the default 64, ≈ 0.5 × 64 × 29 head rows, a fixed cost at
    any probe size; the last layer's lens comes with the next-token entropy, which runs the
    head on the whole subsample, ``n_samples`` rows); ``logit_lens=False`` skips it.
    ``dormant_tau`` follows Sokar et al. 2023 (τ = 0.1 for smooth activations like SiLU/GELU,
    which are never exactly zero).
    """

    max_length: int = PROBE_DEFAULTS["max_length"]
    batch_size: int = PROBE_DEFAULTS["batch_size"]
    n_samples: int = PROBE_DEFAULTS["n_samples"]
    seed: int = 0
    drop_first: bool = True
    dormant_tau: float = 0.1
    logit_lens: bool = True
    lens_samples: int = PROBE_DEFAULTS["lens_samples"]
    max_prompts: int | None = PROBE_DEFAULTS["max_prompts"]

    #: Checked by ``sections.from_table`` (job specs) and :meth:`__post_init__` (everything).
    LIMITS: ClassVar[dict[str, Range]] = {**PROBE_LIMITS, "dormant_tau": Range(0)}

    def __post_init__(self) -> None:
        """Every field of its annotated type and within ``LIMITS`` (the sizes of
        :data:`~collapse_core.probe_settings.PROBE_LIMITS`; a finite ``dormant_tau`` ≥ 0), a
        one-line :class:`CollapseError` otherwise, whichever way the config arrived: CLI,
        page, job spec, run config or a notebook (:func:`~collapse_core.sections.check_fields`)."""
        check_fields(self, "probe setting")

    def key_fields(self) -> dict:
        """The fields that change results (batch size does not). A probe without the lens
        (``logit_lens=False`` or ``lens_samples=0``, as the CLI's ``--lens-samples 0`` and the
        Probe page ask for it) has one key, however it was asked for."""
        fields = asdict(self)
        fields.pop("batch_size")
        if not fields["logit_lens"] or fields["lens_samples"] <= 0:
            fields["logit_lens"], fields["lens_samples"] = False, ProbeConfig.lens_samples
        return fields


@dataclass(frozen=True)
class ProbeSection(ProbeConfig):
    """The ``[probe]`` table of a run config: the :class:`ProbeConfig` fields a file may set
    (``max_prompts`` comes from ``[eval] probe_max_prompts``)."""

    CONFIG_KEYS: ClassVar[tuple[str, ...]] = (
        "max_length",
        "n_samples",
        "batch_size",
        "lens_samples",
    )
    LIMITS: ClassVar[dict[str, Range]] = {k: PROBE_LIMITS[k] for k in CONFIG_KEYS}

    def probe_config(self, max_prompts: int | None = None) -> ProbeConfig:
        """The :class:`ProbeConfig` a run probes with: every ``CONFIG_KEYS`` field of this
        section, the rest at their defaults."""
        return ProbeConfig(
            **{k: getattr(self, k) for k in self.CONFIG_KEYS}, max_prompts=max_prompts
        )


@dataclass
class ProbeResult:
    """What a probe returns: the key, whether it was cached, and the per-layer metrics."""

    probe_key: str
    checkpoint_id: str
    probe_set: str
    cached: bool
    metrics: pd.DataFrame  # wide: index layer, one column per metric
    seconds: float
    n_tokens: int = 0
    extra: dict = field(default_factory=dict)


def probe_key(checkpoint_id: str, probe_set: ProbeSet, config: ProbeConfig) -> str:
    """sha256 of (weights hash, probe-set content hash, config, metric + capture code version)."""
    payload = dumps(
        {
            "weights": checkpoint_id,
            "probe_set": probe_set.content_hash,
            "config": config.key_fields(),
            "metric_code": M.METRIC_CODE_VERSION,
            "capture_code": CAPTURE_VERSION,
        }
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _tokenize(tokenizer, texts: tuple[str, ...], max_length: int) -> list[list[int]]:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return [list(ids) for ids in encoded["input_ids"]]


def _choose_samples(
    lengths: list[int], n_samples: int, first_pos: int, seed: int
) -> list[tuple[int, int]]:
    """A fixed-seed subsample of (prompt, position) pairs among the valid tokens."""
    candidates = [(p, t) for p, n in enumerate(lengths) for t in range(first_pos, n)]
    if not candidates:
        raise CollapseError("the probe set has no tokens left to measure; use longer texts")
    rng = np.random.default_rng(seed)
    take = min(n_samples, len(candidates))
    chosen = rng.choice(len(candidates), size=take, replace=False)
    return sorted(candidates[i] for i in chosen)


def tokenize_probe_set(tokenizer, probe_set: ProbeSet, config: ProbeConfig) -> list[list[int]]:
    """Token ids of each probe text, truncated to ``config.max_length``."""
    texts = probe_set.texts[: config.max_prompts] if config.max_prompts else probe_set.texts
    return _tokenize(tokenizer, texts, config.max_length)


def _stop_if_asked(should_stop: Callable[[], bool] | None, poll_watcher: bool = True) -> None:
    """Raise :class:`Cancelled` when ``should_stop()`` is true or (``poll_watcher``) the
    enclosing :func:`~collapse_core.monitor.watching` block (a pipeline run's cancel flag) asks
    to stop: before each batch (where ``between_batches`` polls the watcher), before the
    head/lens pass and before the summary, so nothing is stored."""
    if should_stop is not None and should_stop():
        raise Cancelled("probe cancelled; nothing was stored")
    if poll_watcher:
        raise_if_stopped("probe")


def run_capture(
    loaded: LoadedModel,
    ids: list[list[int]],
    config: ProbeConfig,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[StreamingCapture, list[tuple[int, int]]]:
    """Stream the token ids through the model with the capture hooks, in the forwards of
    :func:`~collapse_core.batching.plan_batches` (packed rows where the model honours them, else
    padded rows longest first), then run :meth:`StreamingCapture.finish`.
    ``progress(done, total)`` counts :func:`probe_steps`: one per batch and one for ``finish``;
    the caller reports the last (its :func:`summarise`)."""
    tokenizer = loaded.tokenizer
    first = 1 if config.drop_first else 0
    lengths = [len(x) for x in ids]
    samples = _choose_samples(lengths, config.n_samples, first, config.seed)
    parts = model_parts(loaded.model)
    device = loaded.device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lens = lens_design(len(samples), config.lens_samples) if config.logit_lens else None
    capture = StreamingCapture(loaded.model, parts, len(ids), len(samples), lens)
    samples_of_prompt: dict[int, list[tuple[int, int]]] = {}
    for row, (p, t) in enumerate(samples):
        samples_of_prompt.setdefault(p, []).append((row, t))
    skip_head = _skip_head_kwargs(loaded.model)
    batches = plan_batches(
        loaded.model, parts.blocks, device, lengths, config.batch_size, config.max_length
    )
    capture.batches = batches
    n_batches = len(batches)
    total = probe_steps(n_batches)
    with capture, torch.no_grad():
        for b, batch in enumerate(batches):
            _stop_if_asked(should_stop, poll_watcher=False)
            between_batches("probe", b, n_batches)
            tensors = batch_tensors(batch, ids, pad_id, skip_first=first)
            flat, sample_rows = [], []
            for p in tensors.prompts:
                for row, t in samples_of_prompt.get(p, ()):
                    flat.append(tensors.flat_index(p, t))
                    sample_rows.append(row)
            capture.set_batch(
                tensors.valid.to(device),
                tensors.slot_prompt.to(device),
                torch.tensor(tensors.prompts, dtype=torch.long, device=device),
                torch.tensor(flat, dtype=torch.long, device=device),
                torch.tensor(sample_rows, dtype=torch.long, device=device),
            )
            loaded.model(**tensors.inputs_on(device), use_cache=False, **skip_head)
            if progress is not None:
                progress(b + 1, total)
        _stop_if_asked(should_stop)
        capture.finish(logit_lens=config.logit_lens)
        if progress is not None:
            progress(n_batches + 1, total)
    return capture, samples


def _skip_head_kwargs(model: torch.nn.Module) -> dict:
    """``{"logits_to_keep": 1}`` when the model's forward takes it (transformers' causal LMs
    do): the probe reads the head's output only at the token subsample and computes it there
    itself (``StreamingCapture.finish``), so the forward computes one position's logits per row
    instead of every position's. A PEFT wrapper passes it through to its base model. Other
    models run their full head (same results, more work)."""
    return {"logits_to_keep": 1} if forward_accepts(model, "logits_to_keep") else {}


def summary_workers() -> int:
    """Threads :func:`summarise` spreads the layers over: torch's intra-op thread count (what
    ``--threads`` / ``torch.set_num_threads`` set), at most 8."""
    return max(1, min(torch.get_num_threads(), 8))


def summarise(
    capture: StreamingCapture, config: ProbeConfig, workers: int | None = None
) -> tuple[pd.DataFrame, dict]:
    """Turn the accumulated sums into per-layer metrics (long rows) and per-layer spectra.

    Each layer's covariance is formed once (float64, d × d), inside the thread that needs it,
    and feeds both its spectrum and the robust companions. The layers are independent, so
    ``workers`` threads (default :func:`summary_workers`) take one layer at a time, each with a
    single BLAS thread: LAPACK releases the GIL, so on k cores the two ``eigvalsh`` and the
    TwoNN of k layers run at once. This work does not shrink with a faster forward (a GPU), so
    it is the part of a probe's wall time that more cores cut. Every value is the same bit for
    bit whatever ``workers`` is, since each layer always runs on one BLAS thread
    (``tests/test_probe.py``). The pool holds ``workers`` covariances at a time, not all L
    (82 MB of float64 for SmolLM2).
    """
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    state = capture.state
    n, n_layers = state.n_tokens, state.n_layers
    # Everything a layer's metrics read, moved off the device once (stacked over layers).
    sum_unit = state.sum_unit.cpu().numpy()
    prompt_unit = state.prompt_unit.cpu().numpy()
    prompt_count = state.prompt_count.cpu().numpy()
    mean_norm = (state.sum_norm / max(n, 1)).cpu().numpy()
    samples = state.samples.cpu().numpy()
    lens_entropy = state.lens_estimates()

    def layer_values(layer: int) -> tuple[np.ndarray, dict[str, float]]:
        covariance = state.covariance(layer)  # formed in the worker: one d × d per thread
        distinct = state.rank_bound(layer) + 1  # the spectrum's rank bound (capture.py)
        spectrum = M.eigenvalues_from_covariance(covariance, distinct)
        within_between = M.homogeneity_from_sums(prompt_unit[layer], prompt_count)
        values = {
            **M.spectral_metrics_from_eigenvalues(spectrum),
            "anisotropy_cosine": M.anisotropy_cosine_from_sums(sum_unit[layer], n),
            "within_prompt_cosine": within_between["within_prompt_cosine"],
            "between_prompt_cosine": within_between["between_prompt_cosine"],
            "homogeneity_gap": within_between["homogeneity_gap"],
            "mean_norm": mean_norm[layer],
        }
        if len(samples[layer]) >= 10:
            values["twonn_dimension"] = M.twonn_dimension(samples[layer])
        values.update(M.robust_companions(covariance, samples[layer], n_samples=distinct))
        if state.mlp_abs_sum[layer] is not None:
            mean_abs = (state.mlp_abs_sum[layer] / max(n, 1)).cpu().numpy()
            values["dormant_fraction"] = M.dormant_fraction_from_mean_abs(
                mean_abs, config.dormant_tau
            )
        if config.logit_lens and lens_entropy is not None:
            values["logit_lens_entropy"] = lens_entropy[layer]
        if layer == n_layers - 1 and state.final_entropy is not None and len(state.final_entropy):
            values["next_token_entropy"] = float(state.final_entropy.mean())
            values["top1_margin"] = float(state.final_margin.mean())
        return spectrum, values

    threads = summary_workers() if workers is None else max(1, workers)
    with threadpool_limits(1), ThreadPoolExecutor(max_workers=threads) as pool:
        per_layer = list(pool.map(layer_values, range(n_layers)))
    spectra: dict[int, np.ndarray] = {}
    rows: list[tuple[int, str, float]] = []
    for layer, (spectrum, values) in enumerate(per_layer):
        spectra[layer] = spectrum
        rows.extend((layer, name, float(value)) for name, value in values.items())
    return pd.DataFrame(rows, columns=["layer", "metric", "value"]), spectra


def _layer_frames(
    key: str,
    loaded: LoadedModel,
    probe_set: ProbeSet,
    metrics_long: pd.DataFrame,
    spectra: dict[int, np.ndarray],
    capture: StreamingCapture,
    ids: list[list[int]],
    samples: list[tuple[int, int]],
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    ckpt, name = loaded.checkpoint_id, probe_set.name
    lm = metrics_long.assign(probe_key=key, checkpoint_id=ckpt, probe_set=name)
    spec_rows = [
        (key, ckpt, name, layer, i + 1, float(v))
        for layer, eig in spectra.items()
        for i, v in enumerate(eig)
    ]
    spec = pd.DataFrame(
        spec_rows,
        columns=["probe_key", "checkpoint_id", "probe_set", "layer", "idx", "eigenvalue"],
    )
    tok = loaded.tokenizer
    state = capture.state
    entropy = state.final_entropy.cpu().numpy() if state.final_entropy is not None else None
    margin = state.final_margin.cpu().numpy() if state.final_margin is not None else None
    sample_rows = []
    for i, (p, t) in enumerate(samples):
        token_id = ids[p][t]
        sample_rows.append(
            {
                "probe_key": key,
                "sample_idx": i,
                "prompt_idx": p,
                "position": t,
                "token_id": int(token_id),
                "token": tok.decode([token_id]),
                "prompt": probe_set.texts[p][:300],
                "domain": probe_set.domains[p] if probe_set.domains else name,
                "next_token_entropy": float(entropy[i]) if entropy is not None else None,
                "top1_margin": float(margin[i]) if margin is not None else None,
            }
        )
    vectors = []
    lens, proxy = _lens_entropy_rows(capture)
    for layer, arr in enumerate(state.samples.cpu().numpy()):
        vectors.append(
            {
                "probe_key": key,
                "layer": layer,
                "n": arr.shape[0],
                "d": arr.shape[1],
                "data": encode_vectors(arr),
                "lens_entropy": lens[layer].tobytes() if lens is not None else None,
                "lens_proxy": proxy[layer].tobytes() if proxy is not None else None,
            }
        )
    return lm, spec, pd.DataFrame(sample_rows), pd.DataFrame(vectors)


def _lens_entropy_rows(capture: StreamingCapture) -> tuple[np.ndarray | None, ...]:
    """Per layer, the logit-lens entropy and its proxy at every subsample row (L × S float64
    each), NaN at the rows where they were not computed; None without a lens (the proxy: None
    without a two-phase lens). Stored as ``token_vectors.lens_entropy`` and ``lens_proxy`` so
    the lens gets prompt-bootstrap CIs of its own estimator
    (:func:`collapse_core.lens.lens_estimate`) like the next-token metrics."""
    state = capture.state
    if state.lens_exact is None:
        return None, None
    proxy = None if state.lens_proxy is None else state.lens_proxy.cpu().numpy()
    return state.lens_exact.cpu().numpy(), proxy


def probe(
    model: str | Path | LoadedModel,
    probe_set: str | ProbeSet = "general",
    config: ProbeConfig | None = None,
    store: Store | None = None,
    db: str | Path | None = None,
    base: str | Path | None = None,
    device: str = "auto",
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    force: bool = False,
    checkpoint_extra: dict | None = None,
) -> ProbeResult:
    """Probe ``model`` on ``probe_set`` and cache the result (see module docstring).

    ``model`` is a spec for :func:`collapse_core.models.load_model` or an already loaded model.
    ``progress(done, total)`` is called after each batch; ``should_stop()`` cancels between
    batches without storing anything. Returns per-layer metrics as a wide DataFrame.
    """
    config = config or ProbeConfig()
    store = store or Store(db)
    pset = probe_set if isinstance(probe_set, ProbeSet) else load_probe_set(probe_set)
    loaded = model if isinstance(model, LoadedModel) else load_model(model, base, device)
    if checkpoint_extra:
        loaded.extra.update(checkpoint_extra)
    key = probe_key(loaded.checkpoint_id, pset, config)
    started = time.perf_counter()
    if store.has_probe(key) and not force:
        long = store.layer_metrics(key)
        wide = long.pivot(index="layer", columns="metric", values="value")
        if checkpoint_extra:
            with store.transaction() as con:
                store.upsert_checkpoint(con, loaded.checkpoint_row())
        return ProbeResult(key, loaded.checkpoint_id, pset.name, True, wide, 0.0)
    ids = tokenize_probe_set(loaded.tokenizer, pset, config)
    capture, samples = run_capture(loaded, ids, config, progress, should_stop)
    finite = capture.state.finite_layers().cpu()
    if not bool(finite.all()):
        layer = int((~finite).nonzero()[0])
        raise CollapseError(
            f"the model produced NaN/Inf hidden states at layer {layer}; nothing was stored"
        )
    _stop_if_asked(should_stop)
    metrics_long, spectra = summarise(capture, config)
    if progress is not None:
        steps = probe_steps(len(capture.batches))
        progress(steps, steps)
    # Finite states can still leave a metric undefined (TwoNN on a layer of repeated token
    # embeddings, α-ReQ on a flat spectrum): such a value is stored as missing, not as NaN.
    metrics_long = metrics_long[np.isfinite(metrics_long["value"])]
    frames = _layer_frames(key, loaded, pset, metrics_long, spectra, capture, ids, samples)
    seconds = time.perf_counter() - started
    n_tokens = capture.state.n_tokens
    probe_row = {
        "probe_key": key,
        "checkpoint_id": loaded.checkpoint_id,
        "probe_set": pset.name,
        "probe_set_hash": pset.content_hash,
        "config_json": dumps(config.key_fields()),
        "code_version": f"metrics={M.METRIC_CODE_VERSION};capture={CAPTURE_VERSION}",
        "n_prompts": len(ids),
        "n_tokens": n_tokens,
        "n_layers": capture.state.n_layers,
        "device": str(loaded.device),
        "seconds": seconds,
        "created_at": dt.datetime.now(),
    }
    store.write_probe(loaded.checkpoint_row(), probe_row, *frames)
    wide = metrics_long.pivot(index="layer", columns="metric", values="value")
    return ProbeResult(key, loaded.checkpoint_id, pset.name, False, wide, seconds, n_tokens)
