"""``sync_every``: a thread that commits a running call's trees as a checkpoint every interval.

A checkpoint that fails (a file changed while it was copied, the store was unreachable) is
logged and tried again at the next interval; one that can never succeed (the run belongs to
another call, the destination cannot be proven) stops the checkpoints, and the final export
reports the error.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from raysync import redaction
from raysync.errors import ConfigError, DestinationNotVisibleError, RunExistsError

log = redaction.logger("raysync")


class Checkpoints:
    """Calls ``checkpoint(n)`` (n = 1, 2, ...) every ``every`` seconds, holding ``lock`` (the
    lock the final export takes too), until :meth:`close`."""

    def __init__(
        self, every: float, lock: Any, checkpoint: Callable[[int], None], shown: str
    ) -> None:
        self.every, self.lock, self.checkpoint, self.shown = every, lock, checkpoint, shown
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="raysync-sync", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        done = 0
        while not self.stop.wait(self.every):
            with self.lock:
                if self.stop.is_set():
                    return
                try:
                    self.checkpoint(done + 1)
                except (RunExistsError, DestinationNotVisibleError, ConfigError) as e:
                    log.error("raysync: checkpoints of %s stopped: %s", self.shown, e)
                    return
                except Exception as e:  # noqa: BLE001 - a checkpoint must not fail the call
                    log.warning(
                        "raysync: checkpoint %d of %s failed, trying again in %g s: %s",
                        done + 1,
                        self.shown,
                        self.every,
                        e,
                    )
                    continue
                done += 1

    def close(self) -> None:
        """Stop, waiting for a checkpoint in progress (the final export follows it)."""
        self.stop.set()
        self.thread.join()
