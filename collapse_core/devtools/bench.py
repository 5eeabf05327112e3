"""Benchmarks: side-by-side ratios measured in one run (never timed unit tests).

``python -m collapse_core bench probe`` compares, on the same prompts of the same model (the
same padded batches in prompt order, except ``forward_packed`` and the probe, which run the
probe's own batches, ``batching.plan_batches``):

- ``forward``: the bare forward pass (the floor), batches in prompt order as every peer runs;
- ``forward_packed``: the same on the probe's own batches (prompts packed several to a row
  where the model honours packed rows, else padded longest first; ``batching.plan_batches``):
  the like-for-like floor. On the probe texts the probe's batching alone saves what this row
  saves over ``forward``; on the scaling windows (all one length) the two are the same
  batches and it is not run;
- ``naive_hf``: ``output_hidden_states=True``, keep every layer's valid token states, then the
  covariance spectrum and cosine anisotropy per layer;
- ``nnsight``: nnsight 0.8 ``.save()`` of every layer, then the same metrics;
- ``tlens``: TransformerLens 4 ``TransformerBridge.run_with_cache`` of every layer, same metrics;
- ``probe``: our streaming probe (capture + the whole metric suite, no DB write);
- ``probe_nolens``: the same without the logit lens (``logit_lens=False``), which shows the
  lens's share: ``lens_samples`` tokens × every layer × the (vocab × d) LM head;
- ``nnsight_suite``: like for like, nnsight computing *everything the probe stores*
  (:func:`suite_metrics`): besides the states, each MLP's down-projection input (reduced to Σ|h|
  per unit after every trace), then per layer both covariance spectra (full and rogue-free),
  TwoNN and the centred cosine on the probe's own token subsample, the within/between-prompt
  cosines, mean norm, dormant fraction, the next-token entropy and margin on the subsample and
  the logit lens on the probe's lens tokens (final norm + head, chunked). The peer columns
  above compute only the spectrum and the cosine; this one prices the probe's extra metrics
  for a peer, so ``probe / nnsight_suite`` is the like-for-like ratio.

Every column measures the same states the probe documents: layer 0 = the input of block 0 and
layer ℓ = the output of block ℓ *before* the final norm. With transformers 5 the last entry of
``hidden_states`` is after the final norm, so ``naive_hf`` takes the last block's output from a
hook instead. Each peer's effective rank and anisotropy are compared with the probe's, layer by
layer (``agree``: the largest relative difference).

Each variant runs in its own child process so that its peak resident memory (ru_maxrss, which
only grows within a process) can be measured; we report the peak *above* the memory the process
had after loading the model and one warm-up batch (on CUDA: peak allocated above the start).
Times exclude model loading; ``cpu s`` is the child's user+system CPU time, steadier than wall
time on a shared machine. Variants run in interleaved rounds (the order rotates every round);
each cell is the median over rounds and ratios are medians of the per-round ratios. A peer whose
package is missing is reported as such (they are dev dependencies in requirements-dev.txt).

``--baseline DIR`` adds ``probe@base``: the probe of another checkout (e.g. main before a change,
with this bench file) run in the same interleaved rounds, the fair way to compare two versions.

The scaling tables repeat forward / nnsight / probe / probe_nolens / nnsight_suite (and
``probe@base``) on windows of exactly T tokens cut from the mixed probe texts, so the token count
is P·(T − 1), and a last summary prints per size the forward's and the probe's extra CPU
milliseconds per token (equal across sizes = cost linear in tokens) with the probe's ratios.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import CollapseError

VARIANTS = (
    "forward",
    "forward_packed",
    "naive_hf",
    "nnsight",
    "tlens",
    "probe",
    "probe_nolens",
    "nnsight_suite",
)
PEERS = {"naive_hf": None, "nnsight": "nnsight", "tlens": "transformer_lens",
         "nnsight_suite": "nnsight"}  # fmt: skip
SCALING_VARIANTS = ("forward", "nnsight", "probe", "probe_nolens", "nnsight_suite")
GOALS = {"time_vs_forward": 1.10, "memory_vs_nnsight": 1.5}


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def bench_ids(tokenizer, texts: str, n_prompts: int, n_tokens: int) -> list[list[int]]:
    """Token ids of the benchmark prompts.

    ``texts="probeset"``: the first ``n_prompts`` texts of the mixed probe set (general first,
    so 64 prompts = the general set) truncated to ``n_tokens``, exactly as ``probe()`` sees them;
    ``texts="windows"``: ``n_prompts`` windows of exactly ``n_tokens`` tokens cut from the
    concatenated mixed texts.
    """
    from ..errors import CollapseError
    from ..probesets import load_probe_set
    from ..probing import ProbeConfig, tokenize_probe_set

    mixed = load_probe_set("mixed")
    if texts == "probeset":
        if n_prompts > len(mixed.texts):
            raise CollapseError(
                f"the mixed probe set has {len(mixed.texts)} texts, not {n_prompts}"
            )
        config = ProbeConfig(max_length=n_tokens, max_prompts=n_prompts)
        return tokenize_probe_set(tokenizer, mixed, config)
    stream: list[int] = []
    i = 0
    while len(stream) < n_prompts * n_tokens:
        stream.extend(tokenizer(mixed.texts[i % len(mixed.texts)] + "\n")["input_ids"])
        i += 1
    return [stream[k * n_tokens : (k + 1) * n_tokens] for k in range(n_prompts)]


def _batches(ids: list[list[int]], batch: int, pad_id: int, device: torch.device) -> list[tuple]:
    """Right-padded (input_ids, attention_mask, valid) batches, valid = real tokens after the
    first position (the probe's default ``drop_first``)."""
    out = []
    for lo in range(0, len(ids), batch):
        rows = ids[lo : lo + batch]
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            input_ids[r, : len(row)] = torch.tensor(row)
            attention[r, : len(row)] = 1
        valid = attention.bool()
        valid[:, 0] = False
        out.append((input_ids.to(device), attention.to(device), valid.to(device)))
    return out


#: What every column reports per layer and ``agree`` compares with the probe.
AGREE_METRICS = ("effective_rank", "stable_rank", "participation_ratio", "top_pc_share",
                 "alpha_req", "anisotropy_cosine")  # fmt: skip


def _distinct_rows(layer: int, x: torch.Tensor) -> int:
    """The probe's rank bound, + 1, for kept states x (tokens × d): every token counts, and at
    layer 0 (token embeddings) only distinct rows (``CaptureState.rank_bound``)."""
    return min(len(x), len(torch.unique(x, dim=0))) if layer == 0 else len(x)


def peer_metrics(states: list[list[torch.Tensor]]) -> dict[str, list[float]]:
    """What a user script computes from kept states: per layer, the covariance eigenvalues
    (float32 ``torch.cov`` of the token × d matrix, float64 ``eigvalsh``, zero past the rank
    bound of :func:`_distinct_rows`, as the probe's) → the probe's own
    spectral metrics (``metrics.spectral_metrics_from_eigenvalues``, the one mapping from a
    spectrum to numbers), and the mean pairwise cosine of the uncentred tokens (Ethayarajh 2019,
    ``metrics.anisotropy_cosine_from_sums``)."""
    from .. import metrics as M

    out: dict[str, list[float]] = {name: [] for name in AGREE_METRICS}
    for layer, chunks in enumerate(states):
        x = torch.cat(chunks).float()
        spectral = M.spectral_metrics_from_eigenvalues(
            M.eigenvalues_from_covariance(torch.cov(x.T).double(), _distinct_rows(layer, x))
        )
        unit_sum = (x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)).sum(0)
        spectral["anisotropy_cosine"] = M.anisotropy_cosine_from_sums(unit_sum.double(), len(x))
        for name in AGREE_METRICS:
            out[name].append(spectral[name])
    return out


def _keep(states: list[list[torch.Tensor]], layers: list[torch.Tensor], valid: torch.Tensor):
    for layer, h in enumerate(layers):
        states[layer].append(h[valid].float().cpu())


def _run_naive_hf(model, parts, batches) -> list[list[torch.Tensor]]:
    states: list[list[torch.Tensor]] = [[] for _ in range(len(parts.blocks) + 1)]
    last: list[torch.Tensor] = []
    # hidden_states[-1] is after the final norm in transformers 5: take the last block's output.
    handle = parts.blocks[-1].register_forward_hook(
        lambda module, args, output: last.append(output[0] if isinstance(output, tuple) else output)
    )
    try:
        for input_ids, attention, valid in batches:
            out = model(
                input_ids=input_ids, attention_mask=attention, output_hidden_states=True,
                use_cache=False,
            )  # fmt: skip
            _keep(states, [*out.hidden_states[:-1], last.pop()], valid)
            del out
    finally:
        handle.remove()
    return states


def _module_path(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, m in model.named_modules() if m is module)


def _nnsight_blocks(model, parts):
    """nnsight's wrapper of ``model`` and its envoy of the block list (set up before timing)."""
    from nnsight import NNsight

    wrapped = NNsight(model)
    return wrapped, _envoy(wrapped, model, parts.blocks)


def _run_nnsight(wrapped, envoy_blocks, batches) -> list[list[torch.Tensor]]:
    states: list[list[torch.Tensor]] = [[] for _ in range(len(envoy_blocks) + 1)]
    for input_ids, attention, valid in batches:
        saved: list = []
        with wrapped.trace(input_ids=input_ids, attention_mask=attention, use_cache=False):
            saved.append(envoy_blocks[0].input.save())
            for block in envoy_blocks:
                saved.append(block.output.save())
        _keep(states, [s[0] if isinstance(s, tuple) else s for s in saved], valid)
        del saved
    return states


def _envoy(wrapped, model: torch.nn.Module, module: torch.nn.Module):
    """nnsight's envoy of ``module`` inside ``wrapped`` (the wrapper of ``model``)."""
    envoy = wrapped
    for name in _module_path(model, module).split("."):
        envoy = envoy[int(name)] if name.isdigit() else getattr(envoy, name)
    return envoy


def _run_nnsight_suite(wrapped, envoy_blocks, model, parts, batches) -> tuple[list, list, list]:
    """nnsight ``.save()`` of every layer's states and of each MLP's down-projection input;
    the latter is reduced to Σ|h| per unit over the valid tokens right after each trace (what a
    careful user does: keeping it would hold tokens × d_ff floats per layer). Returns the
    states, the per-layer Σ|h| (``None`` for layer 0, as in the probe) and, per kept row, the
    index of its prompt."""
    blocks = list(envoy_blocks)
    mlps = [_envoy(wrapped, model, m) if m is not None else None for m in parts.mlp_out]
    states: list[list[torch.Tensor]] = [[] for _ in range(len(blocks) + 1)]
    abs_sums: list[torch.Tensor | None] = [None] * (len(blocks) + 1)
    prompt_of_row: list[int] = []
    lo = 0
    for input_ids, attention, valid in batches:
        saved: list = []
        mlp_in: list = []
        with wrapped.trace(input_ids=input_ids, attention_mask=attention, use_cache=False):
            saved.append(blocks[0].input.save())
            for block, mlp in zip(blocks, mlps, strict=True):  # in execution order (nnsight)
                mlp_in.append(mlp.input.save() if mlp is not None else None)
                saved.append(block.output.save())
        _keep(states, [s[0] if isinstance(s, tuple) else s for s in saved], valid)
        for i, acts in enumerate(mlp_in, start=1):
            if acts is not None:
                total = acts[valid].float().abs().sum(0).double()
                abs_sums[i] = total if abs_sums[i] is None else abs_sums[i] + total
        rows, _ = valid.nonzero(as_tuple=True)
        prompt_of_row.extend((rows + lo).tolist())
        lo += len(input_ids)
        del saved, mlp_in
    return states, abs_sums, prompt_of_row


def _head_entropy_margin(model, parts, hidden: torch.Tensor, chunk: int = 256,
                         vocab: int | None = None):  # fmt: skip
    """Entropy and top-1 − top-2 probability of softmax(W_U · norm(h)) per row, ``chunk`` rows
    of logits at a time (plain ``log_softmax``: what a user of a peer writes); with ``vocab``
    the softmax over the first ``vocab`` logits only (the lens's proxy)."""
    entropy, margin = [], []
    for lo in range(0, len(hidden), chunk):
        h = hidden[lo : lo + chunk].to(parts.lm_head.weight.dtype)
        logits = parts.lm_head(parts.final_norm(h) if parts.final_norm is not None else h).float()
        logits = logits[:, :vocab]
        logp = torch.log_softmax(logits, dim=-1)
        entropy.append(-(logp.exp() * logp).sum(-1))
        if vocab is None:  # a proxy's vocabulary may be one id: no margin there
            top2 = logp.topk(2, dim=-1).values.exp()
            margin.append(top2[:, 0] - top2[:, 1])
    return torch.cat(entropy).double(), torch.cat(margin).double() if margin else None


def suite_metrics(model, parts, states, abs_sums, prompt_of_row, lengths) -> dict:
    """Every per-layer metric the probe stores, computed from kept states with the probe's
    metric functions (``collapse_core.metrics``) on the probe's own token subsample and lens
    tokens (``probing._choose_samples``, ``probing.lens_sample_index`` with the default
    :class:`~collapse_core.probing.ProbeConfig`). Per layer lists; NaN where the probe stores
    no value (dormant units at layer 0; next-token entropy and margin below the last layer)."""
    from .. import metrics as M
    from ..lens import lens_design, lens_estimate, proxy_vocab
    from ..probing import ProbeConfig, _choose_samples

    config = ProbeConfig()
    first = 1  # _batches keeps positions 1… of every prompt (the probe's default drop_first)
    samples = _choose_samples(lengths, config.n_samples, first, config.seed)
    offsets = np.concatenate([[0], np.cumsum([n - first for n in lengths])])
    sample_rows = torch.as_tensor([offsets[p] + t - first for p, t in samples])
    design = lens_design(len(samples), config.lens_samples)
    prompts = torch.as_tensor(prompt_of_row)
    n_prompts = len(lengths)
    counts = np.bincount(prompts.numpy(), minlength=n_prompts)
    layers = [torch.cat(chunks).float() for chunks in states]
    last = len(layers) - 1
    next_entropy, next_margin = _head_entropy_margin(model, parts, layers[last][sample_rows])

    # The lens's design (collapse_core.lens), its entropies recomputed here with log_softmax.
    def lens_at(below: list[int], rows: np.ndarray, vocab: int | None = None) -> np.ndarray:
        hidden = torch.stack([layers[i][sample_rows[rows]] for i in below])
        flat = hidden.reshape(-1, hidden.shape[-1])
        entropy = _head_entropy_margin(model, parts, flat, vocab=vocab)[0]
        return entropy.view(len(below), len(rows)).numpy()

    exact = np.full((last + 1, len(samples)), np.nan)
    proxy = np.full_like(exact, np.nan)
    exact[last, design.lens] = next_entropy[design.lens].numpy()  # the last layer's lens
    every = list(range(last))
    if design.two_phase and type(parts.lm_head) is torch.nn.Linear:  # as StreamingCapture.finish
        exact[:last, design.exact] = lens_at(every, design.exact)
        vocab = proxy_vocab(parts.lm_head.weight.shape[0])
        proxy[:last, design.proxy] = lens_at(every, design.proxy, vocab)
        topped = design.topped_up(exact[:last, design.exact].T, proxy[:last, design.exact].T)
        if topped.size:
            topped = [int(i) for i in topped]
            exact[np.ix_(topped, design.rest)] = lens_at(topped, design.rest)
            proxy[topped] = np.nan
    else:
        exact[:last, design.lens] = lens_at(every, design.lens)
    lens_entropy = [lens_estimate(exact[i], proxy[i]) for i in range(last + 1)]
    out: dict[str, list[float]] = {}
    nan = float("nan")
    for layer, x in enumerate(layers):
        covariance = torch.cov(x.T).double().numpy()
        distinct = _distinct_rows(layer, x)
        values = M.spectral_metrics_from_eigenvalues(
            M.eigenvalues_from_covariance(covariance, distinct)
        )
        sampled = x[sample_rows].double().numpy()
        values.update(M.robust_companions(covariance, sampled, n_samples=distinct))
        values["twonn_dimension"] = M.twonn_dimension(sampled)
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        unit = (x / norms.clamp_min(1e-12)).double()
        prompt_unit = torch.zeros(n_prompts, x.shape[1], dtype=torch.float64)
        prompt_unit.index_add_(0, prompts, unit)
        values["anisotropy_cosine"] = M.anisotropy_cosine_from_sums(unit.sum(0), len(x))
        values.update(M.homogeneity_from_sums(prompt_unit.numpy(), counts))
        values["mean_norm"] = float(norms.double().mean())
        values["dormant_fraction"] = (
            M.dormant_fraction_from_mean_abs((abs_sums[layer] / len(x)).numpy(), config.dormant_tau)
            if abs_sums[layer] is not None
            else nan
        )
        values["logit_lens_entropy"] = lens_entropy[layer]
        values["next_token_entropy"] = float(next_entropy.mean()) if layer == last else nan
        values["top1_margin"] = float(next_margin.mean()) if layer == last else nan
        for name, value in values.items():
            out.setdefault(name, []).append(float(value))
    return out


def _tlens_bridge(model, tokenizer):
    """TransformerLens' bridge over our loaded model (set up before timing; the bridge switches
    the model's attention to eager, as TransformerLens requires)."""
    from transformer_lens.model_bridge import TransformerBridge

    return TransformerBridge.boot_transformers(
        model.name_or_path, hf_model=model, tokenizer=tokenizer, device=model.device
    )


def _run_tlens(bridge, n_blocks: int, batches) -> list[list[torch.Tensor]]:
    names = ["blocks.0.hook_resid_pre"]
    names += [f"blocks.{i}.hook_resid_post" for i in range(n_blocks)]
    states: list[list[torch.Tensor]] = [[] for _ in names]
    for input_ids, attention, valid in batches:
        _, cache = bridge.run_with_cache(input_ids, attention_mask=attention, names_filter=names)
        _keep(states, [cache[name] for name in names], valid)
        del cache
    return states


def run_variant(variant: str, model_spec: str, n_prompts: int, n_tokens: int, batch: int,
                device: str, texts: str = "probeset", threads: int = 0) -> dict:  # fmt: skip
    """Run one variant in this process; return its wall and CPU time, extra peak memory and
    per-layer effective rank / anisotropy (``None`` and a reason when a peer is missing)."""
    from ..models import load_model, model_parts
    from ..probing import ProbeConfig, run_capture, summarise

    module = PEERS.get(variant)
    if module is not None and importlib.util.find_spec(module) is None:
        return {"variant": variant, "missing": f"{module} is not installed (requirements-dev.txt)"}
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    loaded = load_model(model_spec, device=device, verbose=False)
    model, tok, dev = loaded.model, loaded.tokenizer, loaded.device
    parts = model_parts(model)
    ids = bench_ids(tok, texts, n_prompts, n_tokens)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    batches = _batches(ids, batch, pad_id, dev)
    if variant == "forward_packed":
        from ..batching import batch_tensors, plan_batches

        plan = plan_batches(model, parts.blocks, dev, [len(x) for x in ids], batch, n_tokens)
        own_batches = [batch_tensors(b, ids, pad_id).inputs_on(dev) for b in plan]
    if variant in ("nnsight", "nnsight_suite"):
        wrapped, envoy_blocks = _nnsight_blocks(model, parts)
    elif variant == "tlens":
        bridge = _tlens_bridge(model, tok)
    # Warm up on the widest batch, so the forward's own peak (its logits) is in the baseline.
    widest = max(batches, key=lambda b: b[0].numel())
    with torch.no_grad():
        model(input_ids=widest[0], attention_mask=widest[1], use_cache=False)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_mem = torch.cuda.memory_allocated()
    base_rss = _peak_rss_bytes()
    start, start_cpu = time.perf_counter(), _cpu_seconds()
    agree: dict[str, list[float]] | None = None
    with torch.no_grad():
        if variant == "forward":
            for input_ids, attention, _ in batches:
                out = model(input_ids=input_ids, attention_mask=attention, use_cache=False)
                del out
        elif variant == "forward_packed":
            for inputs in own_batches:
                out = model(**inputs, use_cache=False)
                del out
        elif variant in ("probe", "probe_nolens"):
            # Exactly the probe's code path (it builds its own batches, the ones
            # forward_packed times).
            lens = variant == "probe"
            config = ProbeConfig(max_length=n_tokens, batch_size=batch, logit_lens=lens)
            capture, _ = run_capture(loaded, ids, config)
            long, _ = summarise(capture, config)
            wide = long.pivot(index="layer", columns="metric", values="value")
            agree = {k: wide[k].tolist() for k in wide.columns}
        elif variant == "naive_hf":
            agree = peer_metrics(_run_naive_hf(model, parts, batches))
        elif variant == "nnsight":
            agree = peer_metrics(_run_nnsight(wrapped, envoy_blocks, batches))
        elif variant == "tlens":
            agree = peer_metrics(_run_tlens(bridge, len(parts.blocks), batches))
        elif variant == "nnsight_suite":
            states, abs_sums, prompt_of_row = _run_nnsight_suite(
                wrapped, envoy_blocks, model, parts, batches
            )
            lengths = [len(x) for x in ids]
            agree = suite_metrics(model, parts, states, abs_sums, prompt_of_row, lengths)
        else:
            raise ValueError(variant)
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - start_cpu
    if dev.type == "cuda":
        extra = torch.cuda.max_memory_allocated() - base_mem
    else:
        extra = max(_peak_rss_bytes() - base_rss, 0)
    n_tokens_measured = int(sum(v.sum() for _, _, v in batches))
    return {
        "variant": variant, "seconds": seconds, "cpu_seconds": cpu, "extra_peak_bytes": extra,
        "device": str(dev), "threads": torch.get_num_threads(), "tokens": n_tokens_measured,
        "metrics": agree,
    }  # fmt: skip


BASELINE = "probe@base"


def _run_child(variant: str, args: argparse.Namespace, prompts: int, tokens: int, texts: str):
    # probe@base: the same child command, importing collapse_core from the baseline checkout.
    baseline = variant == BASELINE
    cmd = [
        sys.executable, "-m", "collapse_core.devtools.bench", "_variant",
        "probe" if baseline else variant, args.model, str(prompts), str(tokens),
        str(args.batch_size), args.device, texts, str(args.threads),
    ]  # fmt: skip
    cwd = getattr(args, "baseline", None) if baseline else None
    env = dict(os.environ)
    if args.threads:  # numpy's BLAS too (eigvalsh, TwoNN), not only torch's
        for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env[name] = str(args.threads)
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env)
    if out.returncode != 0:
        return {"variant": variant, "failed": out.stderr.strip().splitlines()[-1:] or ["?"]}
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "variant": variant}


def _interleaved(variants, args, prompts: int, tokens: int, texts: str) -> dict[str, list[dict]]:
    """``args.repeats`` rounds of every variant, the order rotated each round."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    order = list(variants)
    for rnd in range(args.repeats):
        for variant in order:
            if runs[variant] and ("missing" in runs[variant][0] or "failed" in runs[variant][0]):
                continue
            print(f"  {prompts}x{tokens} {texts}: {variant} (round {rnd + 1}/{args.repeats})",
                  file=sys.stderr, flush=True)  # fmt: skip
            runs[variant].append(_run_child(variant, args, prompts, tokens, texts))
        order = order[1:] + order[:1]
    return runs


#: Below one MiB an RSS difference is page-reuse noise, not a measurement.
RSS_FLOOR_BYTES = 1 << 20


def _round_ratios(runs: dict[str, list[dict]], variant: str, base: str, key: str) -> list[float]:
    """variant/base for ``key`` in each round (rounds paired in the order they ran). A memory
    base is floored at :data:`RSS_FLOOR_BYTES`: a peer whose extra peak RSS is ~0 (its peak
    fell inside pages already touched) gave ratios of 1e18 that broke the table."""
    floor = RSS_FLOOR_BYTES if key.endswith("_bytes") else 1e-9
    pairs = zip(runs[variant], runs[base], strict=False)
    return [a[key] / max(b[key], floor) for a, b in pairs]


def _median_ratio(runs: dict[str, list[dict]], variant: str, base: str, key: str) -> float:
    """Median over rounds of :func:`_round_ratios`."""
    return statistics.median(_round_ratios(runs, variant, base, key))


def goal_verdict(per_round: list[float], goal: float) -> str:
    """A goal ratio judged on every paired round, not on the median alone: ``met`` when every
    round is at or under ``goal``, ``NOT met`` when none is, and otherwise ``within noise``
    with how many rounds met it, since on a shared host a median a few hundredths either side
    of the goal says nothing the round-to-round spread does not swamp. The range printed next
    to it (min–max over rounds) is the spread the verdict reads."""
    if not per_round:
        return "not measured"
    met = sum(r <= goal for r in per_round)
    if met == len(per_round):
        return "met"
    if met == 0:
        return "NOT met"
    return f"within noise: {met} of {len(per_round)} rounds met"


def _judged(runs: dict[str, list[dict]], base: str, on_cpu: bool) -> list[float]:
    """The probe's per-round time ratio to ``base`` that a time goal is judged on: wall time
    and, on a CPU (where wall time swings with other load), the larger of the wall and CPU
    ratios of the same round."""
    wall = _round_ratios(runs, "probe", base, "seconds")
    if not on_cpu:
        return wall
    cpu = _round_ratios(runs, "probe", base, "cpu_seconds")
    return [max(w, c) for w, c in zip(wall, cpu, strict=True)]


def _spread(per_round: list[float]) -> str:
    return f"rounds {min(per_round):.2f}-{max(per_round):.2f}" if per_round else "no rounds"


def _agreement(ours: dict | None, peer: dict | None) -> float:
    """Largest relative difference of the per-layer metrics both variants report (inf when one
    reports a layer's value and the other does not)."""
    if not ours or not peer:
        return float("nan")
    worst = 0.0
    for key in ours.keys() & peer.keys():
        a, b = np.asarray(ours[key], dtype=float), np.asarray(peer[key], dtype=float)
        both = np.isfinite(a) & np.isfinite(b)
        if a.shape != b.shape or not np.array_equal(both, np.isfinite(a) | np.isfinite(b)):
            return float("inf")
        diff = np.abs(a[both] - b[both]) / np.maximum(np.abs(b[both]), 1e-12)
        worst = max(worst, float(diff.max(initial=0.0)))
    return worst


def _print_table(runs: dict[str, list[dict]], title: str) -> dict[str, float]:
    """Print one side-by-side table; return the goal ratios of the probe."""
    mb = 1024 * 1024
    ok = [v for v, r in runs.items() if r and "seconds" in r[0]]
    first = runs[ok[0]][0] if ok else {}
    print(f"\n{title}: {first.get('tokens', '?')} measured tokens, device "
          f"{first.get('device', '?')}, {first.get('threads', '?')} threads, "
          f"{len(runs.get('forward', []))} rounds")  # fmt: skip
    head = f"{'variant':<13}{'wall s':>9}{'x fwd':>7}{'cpu s':>9}{'x fwd':>7}{'extra MB':>10}"
    print(head + f"{'x nnsight':>11}{'agree':>9}")
    probe_metrics = runs["probe"][0].get("metrics") if runs.get("probe") else None
    has_nnsight = bool(runs.get("nnsight")) and "seconds" in runs["nnsight"][0]
    for variant, rs in runs.items():
        if not rs:
            continue
        if "seconds" not in rs[0]:
            reason = rs[0].get("missing") or " ".join(rs[0].get("failed", []))
            print(f"{variant:<13}  not run: {reason}")
            continue
        wall = statistics.median(r["seconds"] for r in rs)
        cpu = statistics.median(r["cpu_seconds"] for r in rs)
        extra = statistics.median(r["extra_peak_bytes"] for r in rs) / mb
        row = f"{variant:<13}{wall:>9.2f}{_median_ratio(runs, variant, 'forward', 'seconds'):>7.2f}"
        row += f"{cpu:>9.2f}{_median_ratio(runs, variant, 'forward', 'cpu_seconds'):>7.2f}"
        row += f"{extra:>10.1f}"
        mem = _median_ratio(runs, variant, "nnsight", "extra_peak_bytes") if has_nnsight else None
        row += f"{mem:>11.2f}" if mem is not None else f"{'-':>11}"
        agree = _agreement(probe_metrics, rs[0].get("metrics"))
        compared = variant not in ("forward", "forward_packed", "probe")
        row += f"{agree:>9.1e}" if compared else f"{'-':>9}"
        print(row)
    goals: dict[str, float] = {}
    if runs.get("probe") and "seconds" in runs["probe"][0]:
        goals["time_vs_forward"] = _median_ratio(runs, "probe", "forward", "seconds")
        goals["cpu_vs_forward"] = _median_ratio(runs, "probe", "forward", "cpu_seconds")
        # On a shared CPU box wall time swings with the load; CPU time is judged as well.
        on_cpu = first.get("device") == "cpu"
        judged = _judged(runs, "forward", on_cpu)
        if has_nnsight:
            goals["time_vs_nnsight"] = _median_ratio(runs, "probe", "nnsight", "seconds")
            goals["cpu_vs_nnsight"] = _median_ratio(runs, "probe", "nnsight", "cpu_seconds")
            goals["memory_vs_nnsight"] = _median_ratio(runs, "probe", "nnsight", "extra_peak_bytes")
        print(f"probe / forward time {goals['time_vs_forward']:.3f}x wall, "
              f"{goals['cpu_vs_forward']:.3f}x cpu ({_spread(judged)}; goal <= "
              f"{GOALS['time_vs_forward']}: {goal_verdict(judged, GOALS['time_vs_forward'])})")  # fmt: skip
        if runs.get("forward_packed") and "seconds" in runs["forward_packed"][0]:
            goals["cpu_vs_forward_packed"] = _median_ratio(
                runs, "probe", "forward_packed", "cpu_seconds"
            )
            goals["forward_packed_vs_forward"] = _median_ratio(
                runs, "forward_packed", "forward", "cpu_seconds"
            )
            print(f"same batching, probe / forward_packed {goals['cpu_vs_forward_packed']:.3f}x "
                  f"cpu (the probe's batching alone: forward_packed / forward "
                  f"{goals['forward_packed_vs_forward']:.3f}x cpu)")  # fmt: skip
        if has_nnsight:
            vs_nnsight = _judged(runs, "nnsight", on_cpu)
            memory = _round_ratios(runs, "probe", "nnsight", "extra_peak_bytes")
            print(f"probe / nnsight time {goals['time_vs_nnsight']:.3f}x wall, "
                  f"{goals['cpu_vs_nnsight']:.3f}x cpu ({_spread(vs_nnsight)}; goal <= 1: "
                  f"{goal_verdict(vs_nnsight, 1.0)}); extra memory "
                  f"{goals['memory_vs_nnsight']:.2f}x ({_spread(memory)}; goal <= "
                  f"{GOALS['memory_vs_nnsight']}: "
                  f"{goal_verdict(memory, GOALS['memory_vs_nnsight'])})")  # fmt: skip
        if runs.get("nnsight_suite") and "seconds" in runs["nnsight_suite"][0]:
            goals["time_vs_suite"] = _median_ratio(runs, "probe", "nnsight_suite", "seconds")
            goals["cpu_vs_suite"] = _median_ratio(runs, "probe", "nnsight_suite", "cpu_seconds")
            goals["memory_vs_suite"] = _median_ratio(
                runs, "probe", "nnsight_suite", "extra_peak_bytes"
            )
            print(f"like for like, probe / nnsight_suite (every stored metric): time "
                  f"{goals['time_vs_suite']:.3f}x wall, {goals['cpu_vs_suite']:.3f}x cpu, "
                  f"extra memory {goals['memory_vs_suite']:.2f}x")  # fmt: skip
    return goals


def _sizes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in size.split("x")) for size in text.split(",") if size]


def _check_model(spec: str) -> None:
    """Refuse a model that is neither an alias nor an existing path, once, before any round
    starts a child process that would only report the same error."""
    from .. import assets

    if spec not in assets.MODEL_ALIASES and not Path(spec).expanduser().exists():
        raise CollapseError(
            f"model {spec!r} not found; give `smollm2`, `tiny-random` or a model folder"
        )


def bench_probe(args: argparse.Namespace) -> int:
    """The side-by-side table at one size, then the scaling table (see module docstring)."""
    _check_model(args.model)
    variants = VARIANTS + ((BASELINE,) if getattr(args, "baseline", None) else ())
    runs = _interleaved(variants, args, args.prompts, args.tokens, "probeset")
    for variant, rs in runs.items():
        if rs and "failed" in rs[0]:
            print(f"{variant} failed: {rs[0]['failed']}", file=sys.stderr)
    if any(not runs.get(v) or "failed" in runs[v][0] for v in ("forward", "probe")):
        # A missing peer is reported in its row; without the forward or the probe there is
        # no ratio to print, so the bench fails rather than printing a table of holes.
        print("bench probe: the forward or the probe did not run (see above)", file=sys.stderr)
        return 1
    _print_table(
        runs,
        f"bench probe: {args.model}, {args.prompts} prompts x <= {args.tokens} tokens of the "
        f"probe texts, batch {args.batch_size}",
    )
    scaling = _sizes(args.scaling)
    if not scaling:
        return 0
    rows = []
    for prompts, tokens in scaling:
        size_variants = SCALING_VARIANTS + ((BASELINE,) if getattr(args, "baseline", None) else ())
        size_runs = _interleaved(size_variants, args, prompts, tokens, "windows")
        _print_table(size_runs, f"scaling: {prompts} prompts x {tokens} tokens (windows)")
        rows.append((prompts, tokens, size_runs))
    _print_scaling(rows)
    return 0


def _print_scaling(rows: list[tuple[int, int, dict[str, list[dict]]]]) -> None:
    """One line per size: CPU ms per measured token of the forward and of the probe's extra work
    over it (constant across sizes = cost linear in tokens), and the probe's ratios (CPU time;
    ``wall`` for the probe's wall-time ratio; ``x suite``: like for like against nnsight computing
    every stored metric), paired per round as in the tables above."""
    nan = float("nan")
    print("\nscaling (CPU time; extra = probe - forward, per measured token)")
    print(f"{'size':<10}{'tokens':>8}{'fwd ms/tok':>11}{'extra ms/tok':>13}{'probe x fwd':>12}"
          f"{'wall':>6}{'nolens x fwd':>13}{'x nnsight':>10}{'mem x nnsight':>14}"
          f"{'x suite':>8}{'mem x suite':>12}{'base x fwd':>11}")  # fmt: skip

    def ratio(runs: dict, variant: str, base: str, key: str = "cpu_seconds") -> float:
        ok = all(runs.get(v) and "seconds" in runs[v][0] for v in (variant, base))
        return _median_ratio(runs, variant, base, key) if ok else nan

    for prompts, tokens, runs in rows:
        if not all(runs.get(v) and "seconds" in runs[v][0] for v in ("forward", "probe")):
            print(f"{f'{prompts}x{tokens}':<10}  probe or forward did not run")
            continue
        n = runs["probe"][0]["tokens"]
        fwd = statistics.median(r["cpu_seconds"] for r in runs["forward"])
        extra = statistics.median(
            a["cpu_seconds"] - b["cpu_seconds"]
            for a, b in zip(runs["probe"], runs["forward"], strict=False)
        )
        print(f"{f'{prompts}x{tokens}':<10}{n:>8}{1000 * fwd / n:>11.3f}{1000 * extra / n:>13.3f}"
              f"{ratio(runs, 'probe', 'forward'):>12.2f}"
              f"{ratio(runs, 'probe', 'forward', 'seconds'):>6.2f}"
              f"{ratio(runs, 'probe_nolens', 'forward'):>13.2f}"
              f"{ratio(runs, 'probe', 'nnsight'):>10.2f}"
              f"{ratio(runs, 'probe', 'nnsight', 'extra_peak_bytes'):>14.2f}"
              f"{ratio(runs, 'probe', 'nnsight_suite'):>8.2f}"
              f"{ratio(runs, 'probe', 'nnsight_suite', 'extra_peak_bytes'):>12.2f}"
              f"{ratio(runs, BASELINE, 'forward'):>11.2f}")  # fmt: skip


def bench_summary(args: argparse.Namespace) -> int:
    """``bench summary``: :func:`~collapse_core.probing.summarise` (everything after the last
    batch: two ``eigvalsh``, TwoNN and the companions per layer) of one capture of
    ``--prompts`` × ``--tokens`` probe texts, on one thread and on k = ``--threads`` (0: torch's
    default) in ``--repeats`` interleaved rounds: wall and CPU medians, the speed-up, and
    whether the two results are bit-identical (they must be)."""
    from ..models import load_model
    from ..probing import ProbeConfig, run_capture, summarise

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    loaded = load_model(args.model, device=args.device, verbose=False)
    ids = bench_ids(loaded.tokenizer, "probeset", args.prompts, args.tokens)
    config = ProbeConfig(max_length=args.tokens, batch_size=args.batch_size)
    capture, _ = run_capture(loaded, ids, config)
    times: dict[int, list[tuple[float, float]]] = {1: [], threads: []}
    results = {}
    for rnd in range(args.repeats):
        for workers in (1, threads) if rnd % 2 == 0 else (threads, 1):
            start, start_cpu = time.perf_counter(), _cpu_seconds()
            results[workers] = summarise(capture, config, workers=workers)
            times[workers].append((time.perf_counter() - start, _cpu_seconds() - start_cpu))
    wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    print(f"\nbench summary: {args.model}, {args.prompts} prompts x <= {args.tokens} tokens, "
          f"{capture.state.n_layers} layers, {args.repeats} rounds")  # fmt: skip
    for k in times:
        print(f"{k:>3} thread(s): wall {wall[k]:.3f} s, cpu {cpu[k]:.3f} s")
    (one, one_spectra), (many, many_spectra) = results[1], results[threads]
    same = one.equals(many) and all(
        np.array_equal(one_spectra[layer], many_spectra[layer]) for layer in one_spectra
    )
    print(f"speed-up {wall[1] / max(wall[threads], 1e-9):.2f}x wall on {threads} threads; "
          f"results bit-identical: {same}")  # fmt: skip
    return 0 if same else 1


def main(args: argparse.Namespace) -> int:
    """Dispatch ``python -m collapse_core bench WHAT``."""
    if args.what == "probe":
        return bench_probe(args)
    if args.what == "summary":
        return bench_summary(args)
    if args.what == "train":
        from .bench_train import bench_train

        return bench_train(args)
    if args.what == "faults":
        from .faults import bench_faults

        return bench_faults(args)
    if args.what == "ray":
        from .bench_ray import bench_ray

        return bench_ray(args)
    if args.what == "gpu":
        from .bench_gpu import bench_gpu

        return bench_gpu(args)
    if args.what == "app":
        from .bench_app import bench_app

        return bench_app(args)
    raise SystemExit(f"unknown benchmark {args.what}")


if __name__ == "__main__":
    if len(sys.argv) == 10 and sys.argv[1] == "_variant":
        _, _, name, spec, n_p, n_t, bs, dev, texts, threads = sys.argv
        result = run_variant(name, spec, int(n_p), int(n_t), int(bs), dev, texts, int(threads))
        print(json.dumps(result))
