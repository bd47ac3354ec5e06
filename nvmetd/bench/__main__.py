"""`python -m nvmetd.bench ...` (see nvmetd/bench/cli.py)."""

import sys

from nvmetd.bench.cli import main

sys.exit(main())
