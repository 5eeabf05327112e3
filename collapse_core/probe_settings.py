"""The probe's size settings, their defaults and their limits: the one place the CLI
(``--max-length``, ``--lens-samples`` …), the Probe page's inputs, a run config's ``[probe]``
table and :class:`~collapse_core.probing.ProbeConfig` itself read them from.

This module imports neither torch nor Streamlit, so the CLI parser and the pages can use it
without loading the probing code.
"""

from __future__ import annotations

from typing import Any

from .sections import Range

#: Default of every size setting (``max_prompts`` None = every prompt of the set).
PROBE_DEFAULTS: dict[str, Any] = {
    "max_length": 64,
    "batch_size": 16,
    "n_samples": 512,
    "lens_samples": 64,
    "max_prompts": None,
}

#: Allowed values: each bounds a size the probe allocates from (tokens per prompt, prompts per
#: forward, kept token vectors per layer, LM-head rows per layer, prompts read).
PROBE_LIMITS: dict[str, Range] = {
    "max_length": Range(2, 32_768),
    "batch_size": Range(1, 4096),
    "n_samples": Range(1, 1_000_000),
    "lens_samples": Range(0, 100_000),
    "max_prompts": Range(1, 100_000),
}

#: What each setting means, for ``--help`` and the page's tooltips.
PROBE_HELP: dict[str, str] = {
    "max_length": "tokens kept per prompt",
    "batch_size": "prompts per forward pass when padded; packed rows hold at most "
    "batch_size × max_length positions per forward",
    "n_samples": "token subsample kept per layer (TwoNN, centred cosine, UMAP, next-token metrics)",
    "lens_samples": "subsample tokens the logit lens estimates each layer's entropy over (0: no "
    "lens); it runs the full LM head on 3/8 of them and a cheap proxy on twice as many, as "
    "precise as the exact lens at about half its cost (below 19 tokens: the exact lens)",
    "max_prompts": "use only the first N prompts of each probe set",
}
