"""The secret-canary harness (issue 21): plant a unique fake secret where a user puts a real
one (storage_options), run exports, then look for it everywhere raysync could have copied it:
the Ray session directory (every log of every process), the cluster's internal KV as raysync
wrote it, the destination (manifests, locks, claims, every file), the text and repr of every
error the driver saw, and a worker's environment. Usable for any backend: give it where the
destination lies and the errors you caught."""

from __future__ import annotations

import os
import signal
import sys
import traceback
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import ray


def new() -> str:
    """A value no file on this machine holds by chance."""
    return f"canary{uuid.uuid4().hex}"


def _texts_of(error: BaseException) -> list[str]:
    return [str(error), repr(error), "".join(traceback.format_exception(error))]


def _files_holding(root: Path, needle: bytes) -> list[str]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            path = Path(dirpath) / name
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    return found


def _kv_values() -> list[bytes]:
    from raysync import rayshim

    out = []
    for ns in ("raysync", "raysync_leases"):
        for key in rayshim.kv_list(b"", namespace=ns):
            out.append(key)
            out.append(rayshim.kv_get(key, namespace=ns) or b"")
    return out


@ray.remote
def _worker_environment() -> dict[str, str]:
    return dict(os.environ)


def places(
    canary: str,
    *,
    errors: Iterable[BaseException] = (),
    destination: Iterable[tuple[str, bytes]] = (),
) -> list[str]:
    """Every place ``canary`` was found outside process memory (empty: nowhere)."""
    from raysync import rayshim

    needle = canary.encode()
    found: list[str] = []
    session = rayshim.session_dir()
    if session is not None:
        found += [f"session file {p}" for p in _files_holding(Path(session), needle)]
    found += ["the internal KV" for v in _kv_values() if needle in v][:1]
    found += [f"destination {name}" for name, data in destination if needle in data]
    for e in errors:
        found += [f"error text {type(e).__name__}" for t in _texts_of(e) if canary in t][:1]
    env: dict[str, Any] = ray.get(_worker_environment.remote(), timeout=60)
    found += [f"worker environment {k}" for k, v in env.items() if canary in f"{k}={v}"]
    return found


def act(name: str, how: str, marks: Path) -> str:
    """The body of a canary test's call, in its workspace: ``succeed``, ``fail`` (raise), or
    ``retry`` (kill its own worker the first time, so that Ray runs it again)."""
    Path("export/result.txt").write_text(name)
    if how == "fail":
        raise RuntimeError("the computation failed")
    if how == "retry" and not (marks / name).exists():
        (marks / name).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return name


# Workers cannot import this module by name: its functions travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
