"""``python -m collapse_core ...`` — see :mod:`collapse_core.cli`."""

from .cli import main

raise SystemExit(main())
