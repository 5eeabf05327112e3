"""Collapse Observatory: measure representation collapse across post-training stages.

Notebook use::

    from collapse_core import probe, Store
    result = probe("smollm2", "general")      # per-layer metrics, cached in DuckDB
    Store().query("SELECT * FROM layer_metrics WHERE metric = 'effective_rank'")

Heavy dependencies (torch, transformers) load on first use, so importing the package (and the
dashboard's read-only pages) stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "probe": ("collapse_core.probing", "probe"),
    "ProbeConfig": ("collapse_core.probing", "ProbeConfig"),
    "ProbeResult": ("collapse_core.probing", "ProbeResult"),
    "load_model": ("collapse_core.models", "load_model"),
    "load_probe_set": ("collapse_core.probesets", "load_probe_set"),
    "Store": ("collapse_core.store", "Store"),
    "CollapseError": ("collapse_core.errors", "CollapseError"),
}

__all__ = [
    "CollapseError",
    "ProbeConfig",
    "ProbeResult",
    "Store",
    "load_model",
    "load_probe_set",
    "probe",
]

if TYPE_CHECKING:
    from .errors import CollapseError
    from .models import load_model
    from .probesets import load_probe_set
    from .probing import ProbeConfig, ProbeResult, probe
    from .store import Store


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'collapse_core' has no attribute {name!r}")
