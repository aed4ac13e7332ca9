"""The original project's ``store``, kept by that name for the script and for code written against the original:
the same module object as :mod:`simsearch.store`."""

import sys

from simsearch import store

sys.modules[__name__] = store
