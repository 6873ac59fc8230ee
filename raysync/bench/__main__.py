"""``python -m raysync.bench``."""

import sys

from raysync.bench.cli import main

sys.exit(main())
