"""``python -m raysync``: the raysync command."""

import sys

from raysync.cli import main

sys.exit(main())
