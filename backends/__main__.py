"""`python -m backends`: see backends.cli."""

import sys

from backends.cli import main

sys.exit(main())
