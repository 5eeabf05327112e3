"""Cancel checks and batch progress inside long computations, without threading callbacks
through every function signature.

A caller that runs long work (a pipeline run, a job) wraps it in :func:`watching`::

    with watching(should_stop=ctx.should_stop, on_batch=report):
        evaluate_checkpoint(...)

and the inner loops (eval batches, generation batches, sandboxed programs, training steps,
probe batches) call :func:`between_batches` between units of work. That raises
:class:`~collapse_core.errors.Cancelled` once ``should_stop()`` is true and passes
``(label, done, total)`` to ``on_batch``, so a cancel acts within one batch and progress moves
during evaluations too. Outside :func:`watching` :func:`between_batches` does nothing, so the
library functions behave exactly as before when called directly.

A context variable (not a global) keeps concurrent threads, e.g. a page and a worker thread in
one test process, from seeing each other's watcher.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from .errors import Cancelled

BatchFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Watcher:
    """What :func:`between_batches` consults: the cancel flag and the batch-progress sink."""

    should_stop: Callable[[], bool] | None = None
    on_batch: BatchFn | None = None


_current: ContextVar[Watcher | None] = ContextVar("collapse_watcher", default=None)


@contextmanager
def watching(
    should_stop: Callable[[], bool] | None = None, on_batch: BatchFn | None = None
) -> Iterator[Watcher]:
    """Install a watcher for the work inside the ``with`` block (nested blocks replace it;
    an omitted callback is inherited from the enclosing watcher)."""
    outer = _current.get()
    watcher = Watcher(
        should_stop if should_stop is not None else (outer.should_stop if outer else None),
        on_batch if on_batch is not None else (outer.on_batch if outer else None),
    )
    token = _current.set(watcher)
    try:
        yield watcher
    finally:
        _current.reset(token)


def stop_requested() -> bool:
    """Whether the current watcher's ``should_stop()`` is true (False outside :func:`watching`)."""
    watcher = _current.get()
    return bool(watcher and watcher.should_stop and watcher.should_stop())


def raise_if_stopped(label: str) -> None:
    """Raise :class:`Cancelled` if the current watcher's stop was requested."""
    if stop_requested():
        raise Cancelled(f"cancelled during {label}; nothing partial of this stage was stored")


def between_batches(label: str, done: int, total: int) -> None:
    """Call between units of work: raise :class:`Cancelled` if a stop was requested, else report
    ``done`` of ``total`` units of ``label`` to the watcher (no-op without one)."""
    watcher = _current.get()
    if watcher is None:
        return
    raise_if_stopped(label)
    if watcher.on_batch is not None:
        watcher.on_batch(label, done, total)
