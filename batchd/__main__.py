"""``python -m batchd``: the same command line as the ``batchd`` script (for
machines where batchd is on PYTHONPATH rather than installed)."""

import sys

from .cli import main

sys.exit(main())
