"""Background work, in three parts with one direction of imports:

- :mod:`.queue`: submit, list, cancel and look up jobs (imports only the store; safe for pages
  and compute modules alike);
- :mod:`.handlers`: the explicit table of job kinds → functions that call the library;
- :mod:`.worker`: claims queued jobs, runs their handler with a :class:`.context.JobContext`,
  reaps dead workers, starts a detached worker on demand.

Nothing registers itself by being imported; this package's ``__init__`` imports nothing.
"""
