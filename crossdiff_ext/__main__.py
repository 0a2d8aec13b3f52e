"""`python -m crossdiff_ext ...` is the `crossdiff` command (crossdiff_ext/cli/)."""

import sys

from .cli import main

sys.exit(main())
