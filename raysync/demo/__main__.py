"""``python -m raysync.demo``."""

import sys

from raysync.demo import main

sys.exit(main())
