"""The ``embedding`` job kind: compute a UMAP of stored token samples in a worker process.

Spec: ``{"key": embedding_key, "spec": EmbeddingSpec.to_dict()}`` (see
:func:`collapse_core.embeddings.submit`). The result is cached in the ``embeddings`` table; a
repeat is a cache hit.
"""

from __future__ import annotations

from .jobs import JobContext, handler
from .store import Store


@handler("embedding")
def embedding_job(spec: dict, ctx: JobContext, store: Store) -> dict:
    """Compute (or find cached) the embedding described by ``spec["spec"]``."""
    from .embeddings import EmbeddingSpec, compute_embedding

    selection = EmbeddingSpec.from_dict(spec.get("spec") or spec)
    ctx.log(
        f"embedding ({selection.mode}, {selection.method}) of {', '.join(selection.probe_sets)}"
    )
    result = compute_embedding(store, selection, progress=ctx.progress, should_stop=ctx.should_stop)
    if spec.get("key") and result["embedding_key"] != spec["key"]:
        ctx.log("the probes changed since the job was queued; stored under the new key")
    ctx.log("cache hit" if result["cached"] else f"{result['tokens']} tokens embedded")
    return result
