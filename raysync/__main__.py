"""``python -m raysync``: the raysync command."""

from raysync.cli import run

run()
