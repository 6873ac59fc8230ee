"""Who a call is: the name a run records for its function, which call of that function a
task attempt is making, and the ``{call_id}`` template field (the run rules that use them
are in :mod:`raysync.rules`)."""

from __future__ import annotations

import functools
import hashlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any


def function_name(fn: Callable[..., Any]) -> str:
    """The name a run records for the function that wrote it (``module.qualname``).

    A script's functions live in ``__main__`` whichever script it is, so ``train.py`` and
    ``evaluate.py`` would both write ``__main__.run``, and each would take the other's runs
    for its own: a script's functions are named after the script (``train.run``; ``pkg.train
    .run`` under ``python -m``). Interactive sessions keep ``__main__``.
    """
    if isinstance(fn, functools.partial):  # named after the function it wraps
        return function_name(fn.func)
    module = getattr(fn, "__module__", None) or type(fn).__module__
    if module == "__main__":
        main = sys.modules.get("__main__")
        spec = getattr(main, "__spec__", None)
        path = getattr(main, "__file__", None)
        if spec is not None and spec.name and spec.name != "__main__":
            module = spec.name
        elif isinstance(path, str) and path:
            module = Path(path).stem or module
    # A callable object (an instance with __call__) is named after its class.
    qualname = getattr(fn, "__qualname__", None) or type(fn).__qualname__
    return f"{module}.{qualname}"


def call_id(session: str, job_id: str, task_id: str, function: str, ordinal: int = 1) -> str:
    """The ``{call_id}`` template field: the Ray task id and a digest of the cluster session,
    the job, the function and which call of it this is in its task, so that it differs across
    clusters (a task id alone repeats) and between the decorated calls one task makes, and
    stays the same for every attempt of one call (a retry replaces its own earlier run)."""
    digest = hashlib.sha256(f"{session}\0{job_id}\0{function}\0{ordinal}".encode()).hexdigest()[:8]
    return f"{task_id}-{digest}"


_ordinals: OrderedDict[tuple[str, int, str], int] = OrderedDict()
_ordinals_lock = threading.Lock()


def ordinal_in_task(task_id: str, attempt: int, function: str) -> int:
    """Which call of ``function`` this is within one attempt of a task: 1 for the first, 2
    when the task calls the same decorated function again. It tells such calls apart within
    an attempt (their ``{call_id}``, and their runs: neither replaces the other); a retry
    finds the earlier attempt's runs by task and function, whatever order it calls in.
    Counted per process (a task attempt runs in one worker)."""
    with _ordinals_lock:
        key = (task_id, attempt, function)
        n = _ordinals.pop(key, 0) + 1
        _ordinals[key] = n
        while len(_ordinals) > 4096:  # tasks long finished
            _ordinals.popitem(last=False)
        return n
