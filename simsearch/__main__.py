"""``python -m simsearch run|store|grid|distributed ...``: the command families of :mod:`simsearch.cli`."""

import sys

from simsearch.cli import main

sys.exit(main())
