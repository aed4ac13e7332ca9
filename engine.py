"""The original project's ``engine``, kept by that name for the script and for code written against the original:
the same module object as :mod:`simsearch.encoders`."""

import sys

from simsearch import encoders

sys.modules[__name__] = encoders
