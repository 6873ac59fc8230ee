"""One retry policy for every backend: exponential backoff with full jitter.

A backend says which errors are transient (a dropped connection, a 503, rsync's exit 30);
everything else fails at once. Every retry is logged through the redacting logger, in one
wording, so a user reading the log sees the same line for S3, rsync or a plugin.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from raysync import metrics
from raysync.redaction import logger

log = logger("raysync.retry")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a call up to ``retries`` more times, waiting a random time in
    ``[0, min(max_delay, base_delay * 2**attempt)]`` before each (AWS's "full jitter")."""

    retries: int = 5
    base_delay: float = 0.5
    max_delay: float = 20.0

    def delay(self, attempt: int) -> float:
        """The wait before retry number ``attempt + 1`` (``attempt`` counts from 0)."""
        cap = min(self.max_delay, self.base_delay * 2**attempt)
        return random.uniform(0, cap)  # noqa: S311 - jitter, not cryptography

    def call(
        self,
        what: str,
        fn: Callable[[], T],
        *,
        transient: Callable[[Exception], bool],
        describe: Callable[[Exception], str] = lambda e: f"{type(e).__name__}: {e}",
        before: Callable[[], None] | None = None,
    ) -> T:
        """``fn()``, retried while it raises an error ``transient`` accepts; the last error
        (or the first permanent one) propagates. ``before`` runs before every attempt."""
        for attempt in range(self.retries + 1):
            if before is not None:
                before()
            try:
                return fn()
            except Exception as e:
                if attempt == self.retries or not transient(e):
                    raise
                wait = self.delay(attempt)
                log.warning(
                    "raysync: %s failed (%s); retry %d of %d in %.2fs",
                    what,
                    describe(e),
                    attempt + 1,
                    self.retries,
                    wait,
                )
                metrics.retried()
                time.sleep(wait)
        raise AssertionError("unreachable")
