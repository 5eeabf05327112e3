"""One exception type for every user-facing failure.

The CLI and the app catch :class:`CollapseError` and show ``str(err)`` as a single line: what was
wrong and what to do. Anything else escaping is a bug in this project.
"""


class CollapseError(Exception):
    """A clear, one-line, user-facing error (bad input, missing asset, unsupported model)."""


class Cancelled(CollapseError):
    """Work stopped because a cancel was requested (a job's Cancel button, a run's cancel flag)."""
