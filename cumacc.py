"""The original project's ``cumacc``, kept by that name for the script and for code written against the original:
the same module object as :mod:`simsearch.cumacc`."""

import sys

from simsearch import cumacc

sys.modules[__name__] = cumacc
