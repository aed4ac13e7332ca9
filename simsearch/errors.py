"""The base of the package's errors a user can fix, kept free of imports so the light command line can catch it."""

from __future__ import annotations


class UserError(ValueError):
    """Base of the package's errors a user can fix (a bad file, option, dataset or model name).

    The error boundaries of the script and the class-store commands print these as one line and exit non-zero;
    any other exception is a bug and keeps its traceback. A ``ValueError``, so existing handlers still catch it.
    """
