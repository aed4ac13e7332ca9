"""The original project's ``randomness``, kept by that name for the script and for code written against the original:
the same module object as :mod:`simsearch.randomness`."""

import sys

from simsearch import randomness

sys.modules[__name__] = randomness
