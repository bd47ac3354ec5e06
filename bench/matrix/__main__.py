"""`python -m bench.matrix ...` (see bench/matrix/cli.py)."""

import sys

from bench.matrix.cli import main

sys.exit(main())
