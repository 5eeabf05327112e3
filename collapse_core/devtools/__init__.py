"""Developer tooling kept apart from the probing core: benchmarks (``python -m collapse_core
bench ...``), the bad-input fault catalogue shared by the tests and ``bench faults``, and the
tiny random models the tests and benchmarks build."""
