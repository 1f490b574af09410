"""The one exception type for user-facing failures.

Anything raised as `WeloreError` is a mistake the user can fix (a bad path, a ratio out of range, a
corrupt file); the CLI prints its message on one line and exits non-zero, without a traceback.
Everything else is a bug and keeps its traceback.
"""


class WeloreError(Exception):
    """A user-facing error with a one-line message."""
