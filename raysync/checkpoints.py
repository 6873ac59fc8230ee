"""Checkpoints of a running call: ``sync_every`` (a thread that commits the call's trees every
interval) and :func:`checkpoint` (the call commits them now). Both are the same commit, with one
numbering.

A checkpoint that fails (a file changed while it was copied, the store was unreachable) is
logged and tried again at the next interval; one that can never succeed (the run belongs to
another call, the destination cannot be proven) stops the checkpoints, and the final export
reports the error.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from raysync import redaction
from raysync.errors import (
    ConfigError,
    DestinationNotVisibleError,
    LeaseHeldError,
    RunExistsError,
)

log = redaction.logger("raysync")


@dataclass(frozen=True)
class Checkpoint:
    """A committed checkpoint: its number in the call (1, 2, ...) and the run's URI."""

    number: int
    uri: str


_ACTIVE: contextvars.ContextVar[Callable[[], Checkpoint] | None] = contextvars.ContextVar(
    "raysync_checkpoint", default=None
)


def checkpoint() -> Checkpoint:
    """Commit the running call's trees now as a checkpoint (the same commit as a ``sync_every``
    tick: status ``running``, the next number), and return once it is committed.

    Only inside a call decorated with :func:`raysync.isolated_export` that has a destination;
    works with and without ``sync_every``. It blocks: in an ``async def``, call it with
    ``await asyncio.to_thread(raysync.checkpoint)``."""
    commit = _ACTIVE.get()
    if commit is None:
        raise ConfigError(
            "raysync.checkpoint() is only available inside a call decorated with @isolated_export",
            hint="call it from the decorated function (or code it calls)",
        )
    return commit()


@contextmanager
def active(commit: Callable[[], Checkpoint]) -> Iterator[None]:
    """While the user's function runs, :func:`checkpoint` calls ``commit``."""
    token = _ACTIVE.set(commit)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


class Checkpoints:
    """Calls ``checkpoint()`` every ``every`` seconds, holding ``lock`` (the lock the final
    export and :func:`checkpoint` take too), until :meth:`close`."""

    def __init__(
        self, every: float, lock: Any, checkpoint: Callable[[], Checkpoint], shown: str
    ) -> None:
        self.every, self.lock, self.checkpoint, self.shown = every, lock, checkpoint, shown
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="raysync-sync", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stop.wait(self.every):
            with self.lock:
                if self.stop.is_set():
                    return
                try:
                    self.checkpoint()
                except LeaseHeldError as e:  # the other call may end: try again later
                    log.warning(
                        "raysync: a checkpoint of %s waits for the run's lease: %s",
                        self.shown,
                        e,
                    )
                except (RunExistsError, DestinationNotVisibleError, ConfigError) as e:
                    log.error("raysync: checkpoints of %s stopped: %s", self.shown, e)
                    return
                except Exception as e:  # noqa: BLE001 - a checkpoint must not fail the call
                    log.warning(
                        "raysync: a checkpoint of %s failed, trying again in %g s: %s",
                        self.shown,
                        self.every,
                        e,
                    )

    def close(self) -> None:
        """Stop, waiting for a checkpoint in progress (the final export follows it)."""
        self.stop.set()
        self.thread.join()
