"""Tests import the tiny random models from here; they live in the library so that benchmarks
(``python -m collapse_core bench faults``) can build them too."""

from collapse_core.devtools.tiny_models import (  # noqa: F401
    CHATML_TEMPLATE,
    SPECIAL_TOKENS,
    make_tiny_model,
    make_tiny_tokenizer,
)
