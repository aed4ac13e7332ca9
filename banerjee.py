"""The original project's ``banerjee``, kept by that name for the script and for code written against the original:
the same module object as :mod:`simsearch.datasets`."""

import sys

from simsearch import datasets

sys.modules[__name__] = datasets
