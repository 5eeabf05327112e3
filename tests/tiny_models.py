"""Tests import the tiny random models from here; they live in the library
(:mod:`collapse_core.tiny_models`) because the ``tiny-random`` model alias and the benchmarks
(``python -m collapse_core bench faults``) build them too."""

from collapse_core.tiny_models import (  # noqa: F401
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    make_tiny_model,
    make_tiny_tokenizer,
)
