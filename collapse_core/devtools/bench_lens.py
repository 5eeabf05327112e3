"""``bench lens``: what two-phase logit-lens designs cost, and how wide their CIs are, against
the exact lens on the default ``lens_samples`` tokens, measured on one real capture. The
probe's own design (:mod:`collapse_core.lens`) is the adaptive row marked ``(probe)``.

The logit lens is the probe's largest cost beyond the forward: every lens token costs one row
of the full LM head (d × V) at every layer. A two-phase design (double sampling, Cochran 1977,
§12.6; the difference estimator is the β = 1 case of its regression estimator) runs the full
head on only ``m`` tokens and a cheap proxy on ``n`` ≥ m tokens, and estimates a layer's mean
lens entropy as

    Ĥ = ȳ_m + (x̄_n − x̄_m),

with y the exact entropy and x the proxy at a token. The m tokens are a systematic subsample
of the n, which are one of the probe's random token subsample, so E[x̄_m] = E[x̄_n] and Ĥ is
unbiased whatever the proxy; a proxy that tracks y (small Var(y − x)) only makes it precise.
The proxy here is the entropy of the softmax over the first ``k`` vocabulary ids: BPE
vocabularies number their tokens in merge order, so a prefix holds the frequent tokens.

An adaptive design (:data:`ADAPTIVE`) keeps the exact lens wherever the proxy is too weak:
its m exact tokens are taken from the probe's own lens tokens, and at a layer where the
two-phase variance predicted from those m tokens exceeds the exact lens's
(:meth:`~collapse_core.lens.LensDesign.topped_up`), the remaining lens tokens get their full head rows and the
layer keeps the probe's estimate as it is. Its cost is then between the two-phase design's
and the exact lens's (plus the proxy), and no layer should come out much wider than now.

The study changes nothing the probe stores. It captures once, computes the exact entropy of
every subsample token at every layer but the last (whose lens value is the next-token
entropy, computed for every token anyway), the proxies, and the CPU time per row of each, then
prints for each design its measured cost relative to the probe's exact lens and the ratio of
its prompt-bootstrap standard error (the draws of :mod:`collapse_core.uncertainty`) to the
exact lens's, per layer.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import CollapseError
from ..lens import lens_design, nested_design, proxy_vocab

#: Proxies: (fraction of the vocabulary kept as its first ids, whether each token's own id
#: joins them). SmolLM2: the first 2,048, 4,096 and 8,192 ids; 4,096 plus the token's own.
PROXIES = ((1 / 24, False), (1 / 12, False), (1 / 6, False), (1 / 12, True))
#: (m exact tokens, n proxy tokens) per layer of each two-phase design.
DESIGNS = ((16, 64), (16, 128), (24, 128), (16, 192), (32, 256))
#: (m exact tokens, n proxy tokens) of each adaptive design: the m exact tokens are taken
#: from the probe's own lens tokens, and a layer whose two-phase estimate is predicted to be
#: less precise than the exact lens (``LensDesign.topped_up``) is topped up to the
#: exact lens (its remaining lens tokens' full head rows, the probe's estimate as it is).
ADAPTIVE = ((16, 128), (24, 128), (24, 192))
#: Prompt-bootstrap replicates the standard errors are read from.
N_BOOT = 400


@torch.no_grad()
def prefix_vocab_entropy(
    capture, hidden: torch.Tensor, k: int, own_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropy −Σ p log p of p = softmax over the first ``k`` logits of the model's head, per
    row of the pre-norm states ``hidden`` (rows × d): the final norm, W[:k] · u (+ b[:k]) and
    the head's final-logit transforms (the probe's own ``_logit_blocks`` cut to k ids),
    reduced by the probe's own streamed softmax (``capture._softmax_stats``). With
    ``own_ids`` (one vocabulary id per row, e.g. the token at that position) the row's own id
    joins its vocabulary when it lies past k: early layers' lens puts most of its mass there. Only a plain ``nn.Linear`` head can be cut."""
    from ..capture import _HEAD_ROWS, _softmax_stats

    if not capture._plain_head:
        raise CollapseError("bench lens needs a plain nn.Linear LM head (cut to a prefix)")
    weight, bias = capture.parts.lm_head.weight, capture.parts.lm_head.bias
    out = torch.empty(hidden.shape[0], dtype=torch.float64)
    for start in range(0, hidden.shape[0], _HEAD_ROWS):
        normed = capture._normed(hidden[start : start + _HEAD_ROWS])
        rows = slice(start, start + normed.shape[0])

        def blocks(normed=normed, rows=rows):
            yield from capture._logit_blocks(normed, k)
            if own_ids is not None:
                ids = own_ids[rows].to(weight.device)
                own = (weight[ids] * normed).sum(1).float()
                if bias is not None:
                    own += bias[ids].float()
                own = capture._final_transforms_(own[None, :])
                # ids inside the prefix are counted already: exp(−1e30 − max) is exactly 0
                yield torch.where(ids[None, :] < k, torch.full_like(own, -1e30), own)

        entropy, _ = _softmax_stats(blocks(), False)
        out[rows] = entropy.cpu()
    return out


def prompt_bootstrap_counts(
    prompt_of_row: Sequence[int], n_boot: int = N_BOOT, seed: int = 0
) -> np.ndarray:
    """B × rows multiplicities of a prompt bootstrap: replicate b draws the prompts with
    replacement, and each row counts as often as its prompt was drawn (the resampling of
    :func:`collapse_core.uncertainty.prompt_draws`, as the probe's CIs draw them)."""
    import pandas as pd

    from ..uncertainty import prompt_draws

    prompts = pd.factorize(pd.Series(list(prompt_of_row)))[0]
    draws = list(prompt_draws(int(prompts.max()) + 1, n_boot, seed))
    return np.asarray(draws)[:, prompts].astype(np.float64)


def _weighted_means(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Σ wᵢvᵢ / Σ wᵢ per row of ``weights`` (B × n), for ``values`` of n or n × layers;
    NaN where a replicate drew none of the rows."""
    total = weights.sum(-1)
    if values.ndim == 2:  # one column per layer
        total = total[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return (weights @ values) / total


def difference_estimate(
    exact: np.ndarray, proxy_at_exact: np.ndarray, proxy: np.ndarray,
    weights_exact: np.ndarray | None = None, weights_proxy: np.ndarray | None = None,
) -> np.ndarray | float:  # fmt: skip
    """Two-phase difference estimator Ĥ = ȳ_m + (x̄_n − x̄_m) (Cochran 1977, §12.6, β = 1):
    ``exact`` y and ``proxy_at_exact`` x at the m exact tokens, ``proxy`` x at the n proxy
    tokens (one column per layer, or one value per token). With multiplicities (B × m,
    B × n) it returns the B weighted replicates."""
    if weights_exact is None or weights_proxy is None:
        value = np.mean(exact, 0) + np.mean(proxy, 0) - np.mean(proxy_at_exact, 0)
        return float(value) if np.ndim(value) == 0 else value
    return (
        _weighted_means(weights_exact, exact)
        + _weighted_means(weights_proxy, proxy)
        - _weighted_means(weights_exact, proxy_at_exact)
    )


def design_rows(n_rows: int, m: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the subsample a design uses: n proxy rows spread evenly over it (the probe's
    :func:`~collapse_core.probing.lens_sample_index`) and the m exact rows spread evenly over
    those, so the exact tokens are a subsample of the proxy tokens."""
    from ..lens import lens_sample_index

    proxy_rows = lens_sample_index(n_rows, n)
    return proxy_rows[lens_sample_index(len(proxy_rows), m)], proxy_rows


@dataclass
class DesignResult:
    """One design on one capture: its lens cost (CPU time of its head rows / the exact
    lens's), per layer its SE ratio to the exact lens and |estimate − all-token mean| in
    the exact lens's SEs, and (adaptive designs) how many layers were topped up."""

    cost: float
    se_ratio: np.ndarray
    off: np.ndarray
    topped_up: int = 0


def measure_designs(
    loaded, ids: list[list[int]], config, lens_tokens: int
) -> tuple[dict[str, DesignResult], dict[str, float]]:
    """Capture ``ids`` once (``config``, lens off), then score every design of the module
    docstring against the exact lens on ``lens_tokens`` tokens per layer: the exact entropy
    of every subsample token at every layer but the last, the proxies, and their CPU time
    per row, measured here. Returns design label → :class:`DesignResult`, and the timings
    (``exact_row`` and ``proxy_row_<proxy>`` seconds, ``rows`` subsample tokens, ``layers``)."""
    from ..lens import lens_sample_index
    from ..probing import run_capture
    from .bench import _cpu_seconds

    capture, samples = run_capture(loaded, ids, config)
    states = capture.state.samples[:-1]  # the last layer's lens is the next-token entropy
    n_layers, n_rows, _ = states.shape
    if n_rows < 2 * lens_tokens:
        raise CollapseError(f"bench lens: the subsample holds {n_rows} tokens; it needs at least "
                            f"{2 * lens_tokens} (more --prompts or --tokens)")  # fmt: skip
    vocab = capture.parts.lm_head.weight.shape[0]
    flat = states.reshape(-1, states.shape[-1])
    start = _cpu_seconds()
    exact = capture._head_entropy(flat, False)[0].cpu().numpy().reshape(n_layers, n_rows)
    timing = {"exact_row": (_cpu_seconds() - start) / flat.shape[0], "rows": n_rows,
              "layers": n_layers, "vocab": vocab}  # fmt: skip
    token_ids = torch.tensor([ids[p][t] for p, t in samples]).repeat(n_layers)
    proxies = {}
    for fraction, with_own in PROXIES:
        k = max(1, round(vocab * fraction))
        name = f"{k:,}+own" if with_own else f"{k:,}"
        start = _cpu_seconds()
        entropy = prefix_vocab_entropy(capture, flat, k, token_ids if with_own else None)
        proxies[name] = entropy.numpy().reshape(n_layers, n_rows)
        timing[f"proxy_row_{name}"] = (_cpu_seconds() - start) / flat.shape[0]
    counts = prompt_bootstrap_counts([p for p, _ in samples])
    everything = exact.mean(1)  # every subsample token, exact: the closest truth this run has
    now = lens_sample_index(n_rows, lens_tokens)
    se_now = np.nanstd(_weighted_means(counts[:, now], exact[:, now].T), axis=0)
    exact_cost = lens_tokens * timing["exact_row"]

    def result(
        cost: float, replicates: np.ndarray, point: np.ndarray, topped_up: int = 0
    ) -> DesignResult:
        return DesignResult(cost, np.nanstd(replicates, axis=0) / se_now,
                            np.abs(point - everything) / se_now, topped_up)  # fmt: skip

    out = {}
    probe_design = lens_design(n_rows, lens_tokens)
    for label, tokens in ((f"exact {lens_tokens}", lens_tokens),
                          (f"exact {lens_tokens // 4}", lens_tokens // 4)):  # fmt: skip
        rows = lens_sample_index(n_rows, tokens)
        replicates = _weighted_means(counts[:, rows], exact[:, rows].T)
        out[label] = result(len(rows) / lens_tokens, replicates, exact[:, rows].mean(1))
    for k, proxy in proxies.items():
        for m, n in DESIGNS:
            if n > n_rows:
                continue
            ex, px = design_rows(n_rows, m, n)
            phases = (exact[:, ex].T, proxy[:, ex].T, proxy[:, px].T)
            replicates = difference_estimate(*phases, counts[:, ex], counts[:, px])
            point = difference_estimate(*phases)
            proxy_cost = len(px) * timing[f"proxy_row_{k}"]
            cost = (len(ex) * timing["exact_row"] + proxy_cost) / exact_cost
            out[f"k={k} m={len(ex)} n={len(px)}"] = result(cost, replicates, point)
        for m, n in ADAPTIVE:
            if n > n_rows or m >= lens_tokens:
                continue
            design = nested_design(n_rows, lens_tokens, m, n)
            ex, lens_rows, px = design.exact, design.lens, design.proxy
            phases = (exact[:, ex].T, proxy[:, ex].T, proxy[:, px].T)
            top_up = np.zeros(n_layers, dtype=bool)
            top_up[design.topped_up(phases[0], phases[1])] = True
            # the decision is taken once on the sample, not again in every bootstrap replicate
            exact_lens = exact[:, lens_rows].T
            replicates = np.where(
                top_up,
                _weighted_means(counts[:, lens_rows], exact_lens),
                difference_estimate(*phases, counts[:, ex], counts[:, px]),
            )
            point = np.where(top_up, exact_lens.mean(0), difference_estimate(*phases))
            rows = len(ex) + top_up.mean() * (len(lens_rows) - len(ex))
            proxy_cost = len(px) * timing[f"proxy_row_{k}"]
            cost = (rows * timing["exact_row"] + proxy_cost) / exact_cost
            label = f"k={k} m={len(ex)}..{len(lens_rows)} n={len(px)}"
            if (
                k == f"{proxy_vocab(vocab):,}"
                and np.array_equal(ex, probe_design.exact)
                and (np.array_equal(px, probe_design.proxy))
            ):
                label += " (probe)"
            out[label] = result(cost, replicates, point, int(top_up.sum()))
    return out, timing


def bench_lens(args: argparse.Namespace) -> int:
    """``bench lens``: the two-phase designs of the module docstring against the probe's exact
    lens (the default ``lens_samples`` tokens per layer) on ``--prompts`` × ``--tokens``, over
    ``--repeats`` token subsamples (probe seeds 0, 1, …): each design's median cost, its SE
    ratio (median and worst over layers and subsamples) and its largest distance to the
    all-token mean."""
    from ..models import load_model
    from ..probe_settings import PROBE_DEFAULTS
    from ..probing import ProbeConfig
    from .bench import bench_ids

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device=args.device, verbose=False)
    ids = bench_ids(loaded.tokenizer, "probeset", args.prompts, args.tokens)
    lens_tokens = PROBE_DEFAULTS["lens_samples"]
    draws = []
    for seed in range(args.repeats):
        config = ProbeConfig(max_length=args.tokens, batch_size=args.batch_size,
                             logit_lens=False, seed=seed)  # fmt: skip
        draws.append(measure_designs(loaded, ids, config, lens_tokens))
        print(f"subsample {seed + 1}/{args.repeats} measured", file=sys.stderr, flush=True)
    timing = {key: statistics.median(t[key] for _, t in draws) for key in draws[0][1]}
    exact_seconds = lens_tokens * timing["layers"] * timing["exact_row"]
    print(f"\nbench lens: {args.model}, {len(ids)} prompts x <= {args.tokens} tokens, "
          f"{timing['rows']:.0f} subsample tokens, lens on {timing['layers']:.0f} layers, "
          f"vocabulary {timing['vocab']:,.0f}, {args.repeats} subsample(s), "
          f"{N_BOOT} prompt-bootstrap draws each")  # fmt: skip
    print(f"exact head row {timing['exact_row'] * 1e3:.3f} ms CPU; the exact lens "
          f"({lens_tokens} tokens/layer) = {exact_seconds:.2f} s CPU")  # fmt: skip
    for key, t in timing.items():
        if key.startswith("proxy_row_"):
            print(f"proxy on the first {key[10:]} ids: {t * 1e3:.3f} ms CPU per row "
                  f"({t / timing['exact_row']:.3f} of an exact row)")  # fmt: skip
    print(f"{'design':<32}{'lens cost':>10}{'saves s':>9}{'SE ratio median':>17}"
          f"{'worst (layer)':>16}{'layers > 1.25':>15}{'max |Δ all| / SE':>18}"
          f"{'topped up':>11}")  # fmt: skip
    for label in draws[0][0]:
        results = [d[label] for d, _ in draws]
        cost = statistics.median(r.cost for r in results)
        ratio = np.stack([r.se_ratio for r in results])  # subsamples × layers
        seed, worst = np.unravel_index(np.nanargmax(ratio), ratio.shape)
        wide = int(np.sum(np.any(ratio > 1.25, axis=0)))
        off = max(float(np.nanmax(r.off)) for r in results)
        topped = "-" if ".." not in label else "/".join(str(r.topped_up) for r in results)
        print(f"{label:<32}{cost:>9.2f}x{(1 - cost) * exact_seconds:>9.2f}"
              f"{np.nanmedian(ratio):>16.2f}x{ratio[seed, worst]:>10.2f}x ({worst:>2})"
              f"{wide:>15}{off:>18.2f}{topped:>11}")  # fmt: skip
    print("lens cost: CPU time of the design's head rows / the exact lens's (median over "
          "subsamples); SE ratio: prompt-bootstrap SE / the exact lens's, per layer, median and "
          "worst over layers and subsamples; layers > 1.25: layers wider than 1.25x in any "
          "subsample; max |Δ all|: largest |estimate − exact mean over every subsample token|, "
          "in the exact lens's SEs; m..L (adaptive): m exact tokens from the lens's L, a layer "
          "topped up to the exact lens where the two-phase variance predicted from the m tokens "
          "exceeds it (topped up: layers, per subsample)")  # fmt: skip
    return 0
