"""``python -m fastmeta``: see :mod:`fastmeta.cli`."""

import sys

from fastmeta.cli import main

sys.exit(main())
