"""The original project's ``utils``, kept by that name for the script and for code written against the original:
the same module object as :mod:`simsearch.utils`."""

import sys

from simsearch import utils

sys.modules[__name__] = utils
