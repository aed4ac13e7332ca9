"""The original project's ``visual``, kept by that name for the script and for code written against the original:
the same module object as :mod:`simsearch.visual`."""

import sys

from simsearch import visual

sys.modules[__name__] = visual
