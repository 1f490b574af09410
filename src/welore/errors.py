"""The one exception type for user-facing failures.

Anything raised as `WeloreError` is a mistake the user can fix (a bad path, a ratio out of range, a
corrupt file); the CLI prints its message on one line and exits non-zero, without a traceback.
Everything else is a bug and keeps its traceback.
"""


class WeloreError(Exception):
    """A user-facing error with a one-line message."""


def one_line(e: BaseException, limit: int = 300) -> str:
    """The first line of a library's exception message, for a WeloreError that wraps it."""
    msg = str(e).strip().splitlines()
    return (msg[0] if msg else type(e).__name__)[:limit]
