"""One exception type for every user-facing failure.

The CLI prints ``EffdeployError`` as a single line and exits non-zero; anything else is a bug
and keeps its traceback.
"""


class EffdeployError(Exception):
    """A problem with the user's input (file, config, data), stated in one line."""
