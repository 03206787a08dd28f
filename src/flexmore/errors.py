"""One exception type for every user-facing failure.

The CLI turns a `FlexmoreError` into one line on stderr and a non-zero exit; anything else is a bug
and keeps its traceback.
"""


class FlexmoreError(ValueError):
    """Bad input or an impossible request, described in one line naming the file, tensor or option."""
