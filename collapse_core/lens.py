"""The logit lens's sampling design: an adaptive two-phase estimate of each layer's mean lens
entropy, as precise as the exact lens on ``lens_samples`` tokens at about half its cost.

The exact lens costs one row of the full LM head (V × d) per lens token and layer: on SmolLM2
at 64 prompts × 64 tokens its 64 × 29 rows cost more than the bare forward's own head. The
design below (double sampling, Cochran 1977, §12.6; the difference estimator is the β = 1 case
of its regression estimator) runs the full head on m of the L lens tokens and a cheap proxy on
n ≈ 2L tokens, and estimates the layer's mean entropy as

    Ĥ = ȳ_m + (x̄_n − x̄_m),

y the exact entropy and x the proxy at a token: the entropy of the softmax over the first
``V · PROXY_VOCAB_FRACTION`` vocabulary ids (BPE vocabularies number their tokens in merge
order, so a prefix holds the frequent ones). The m tokens are a subsample of the n, which are
a systematic sample of the probe's random token subsample, so Ĥ is unbiased whatever the proxy;
a proxy that tracks y only makes it precise. Where it does not (the embeddings and first blocks
of SmolLM2, every layer of a model whose ids carry no frequency order), the variance predicted
from the m tokens (:func:`predicted_variance_ratio`) exceeds the exact lens's, and the layer is
*topped up*: its other L − m lens tokens get their full head rows and it keeps the exact lens's
estimate, the mean over the L tokens, as before this design.

Measured with ``python -m collapse_core bench lens`` (SmolLM2, 3 token subsamples): the design
with m = 24, n = 128 (146 with the exact tokens) and the first 2,048 ids costs 0.49× the exact
lens, its prompt-bootstrap SE is 0.67× the exact lens's at the median layer and 1.00× at the
worst (1–2 layers topped up); on the tiny random model every layer is topped up (SE 1.00×).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: The proxy's vocabulary: the first ``round(V · PROXY_VOCAB_FRACTION)`` ids (2,048 of 49,152).
PROXY_VOCAB_FRACTION = 1 / 24
#: m = ⌈EXACT_FRACTION · L⌉ exact tokens of an L-token lens (24 of 64) ...
EXACT_FRACTION = 3 / 8
#: ... and n = PROXY_FACTOR · L proxy tokens (128 of the 512-token subsample).
PROXY_FACTOR = 2
#: Below this many exact tokens the variance test is too noisy to trust: the lens stays exact.
MIN_EXACT = 8


@dataclass(frozen=True)
class LensDesign:
    """Rows of the probe's token subsample the logit lens reads: ``lens``, the L rows of the
    exact lens (:func:`~collapse_core.probing.lens_sample_index`; a topped-up layer's exact
    rows); ``exact``, the m rows with the full head at every layer (a subset of ``lens``); and
    ``proxy``, the rows with the proxy (a superset of ``exact``; empty: the exact lens)."""

    lens: np.ndarray
    exact: np.ndarray
    proxy: np.ndarray

    @property
    def two_phase(self) -> bool:
        return self.proxy.size > 0

    @property
    def rest(self) -> np.ndarray:
        """The lens rows without full head rows until their layer is topped up."""
        return np.setdiff1d(self.lens, self.exact)

    def topped_up(self, exact: np.ndarray, proxy_at_exact: np.ndarray) -> np.ndarray:
        """The layers to top up to the exact lens, from each layer's (column's) values at the
        m ``exact`` rows: those whose :func:`predicted_variance_ratio` exceeds 1."""
        ratio = predicted_variance_ratio(exact, proxy_at_exact, len(self.proxy), len(self.lens))
        return np.flatnonzero(ratio > 1)


def lens_sample_index(n_samples: int, lens_samples: int) -> np.ndarray:
    """Which rows of the sorted (prompt, position) subsample the logit lens uses.

    Every (n_samples / lens_samples)-th row, evenly spaced over the whole subsample, so the lens
    tokens are spread across all prompts (a systematic sample of a random sample) instead of the
    first few prompts' tokens.
    """
    take = min(max(lens_samples, 0), n_samples)
    if take == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n_samples - 1, take).round().astype(np.int64))


def lens_design(n_samples: int, lens_samples: int) -> LensDesign:
    """The design for an L = ``lens_samples``-token lens on an ``n_samples``-token subsample:
    m = ⌈3L/8⌉ exact rows evenly spread over the L lens rows, and the proxy on n = 2L rows evenly
    spread over the subsample plus the m; the exact lens (no proxy) when m < :data:`MIN_EXACT`
    or the subsample has no more rows than the lens."""
    lens = lens_sample_index(n_samples, lens_samples)
    m = math.ceil(EXACT_FRACTION * len(lens))
    n = min(PROXY_FACTOR * len(lens), n_samples)
    if m < MIN_EXACT or n <= len(lens):
        return LensDesign(lens, lens, np.zeros(0, dtype=np.int64))
    return nested_design(n_samples, lens_samples, m, n)


def nested_design(n_samples: int, lens_samples: int, m: int, n: int) -> LensDesign:
    """A two-phase design with m exact and n proxy tokens: the ``lens_samples`` lens rows, the
    m exact rows evenly spread over them, and the proxy on n rows evenly spread over the
    subsample plus the m, so the exact rows are a subsample of both."""
    lens = lens_sample_index(n_samples, lens_samples)
    exact = lens[lens_sample_index(len(lens), m)]
    return LensDesign(lens, exact, np.union1d(lens_sample_index(n_samples, n), exact))


def proxy_vocab(vocab: int) -> int:
    """How many leading vocabulary ids the proxy reads: round(V · PROXY_VOCAB_FRACTION), ≥ 1."""
    return max(1, round(vocab * PROXY_VOCAB_FRACTION))


def predicted_variance_ratio(
    exact: np.ndarray, proxy_at_exact: np.ndarray, n_proxy: int, lens_tokens: int
) -> np.ndarray:
    """Per layer (columns of the m × layers pairs), the variance of the two-phase difference
    estimate over the exact lens's, predicted from the m exact tokens alone under simple random
    sampling: [s_y²/n + s_d²(1/m − 1/n)] / (s_y²/L), with s_y² the variance of the exact
    entropy y, s_d² that of y − x, n proxy and L exact-lens tokens (Cochran 1977, §12.6, the
    double-sampling variance with β = 1). A ratio > 1: the proxy does not track y well enough
    for m exact tokens to beat L. Tokens of one prompt are treated as independent: the lens
    tokens are about one per prompt."""
    exact = np.asarray(exact, dtype=np.float64)
    proxy_at_exact = np.asarray(proxy_at_exact, dtype=np.float64)
    m = exact.shape[0]
    s_y = np.var(exact, axis=0, ddof=1)
    s_d = np.var(exact - proxy_at_exact, axis=0, ddof=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = (s_y / n_proxy + s_d * (1 / m - 1 / n_proxy)) / (s_y / lens_tokens)
    return np.where(s_y > 0, ratio, np.where(s_d > 0, np.inf, 0.0))


def lens_estimate(
    exact: np.ndarray, proxy: np.ndarray | None, weights: np.ndarray | None = None
) -> float:
    """One layer's lens estimate from its per-row values (NaN where a row has none): with no
    proxy value, the (weighted) mean of ``exact``; else the difference estimator
    Ĥ = ȳ_m + x̄_n − x̄_m as Σw(y − x)/Σw over the exact rows + Σwx/Σw over the proxy rows
    (the exact rows are proxy rows too). ``weights``: multiplicities, e.g. a prompt
    bootstrap's (default 1); NaN when they leave no exact row."""
    exact = np.asarray(exact, dtype=np.float64)
    w = np.ones(exact.shape) if weights is None else np.asarray(weights, dtype=np.float64)
    has_exact = np.isfinite(exact) & (w > 0)
    total = w[has_exact].sum()
    if total <= 0:
        return float("nan")
    if proxy is None or not np.isfinite(proxy).any():
        return float(np.dot(w[has_exact], exact[has_exact]) / total)
    proxy = np.asarray(proxy, dtype=np.float64)
    has_proxy = np.isfinite(proxy) & (w > 0)
    difference = exact[has_exact] - proxy[has_exact]
    return float(
        np.dot(w[has_exact], difference) / total
        + np.dot(w[has_proxy], proxy[has_proxy]) / w[has_proxy].sum()
    )
