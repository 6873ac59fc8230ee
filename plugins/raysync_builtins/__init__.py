"""raysync's built-in export backends, registered through the ``raysync`` entry-point group
exactly like a third-party plugin: ``local`` (local-copy) and ``value`` (return-by-value)."""
