"""Per-call private workspaces (DESIGN invariant 1).

Each call gets ``<ray session dir>/raysync_workspaces/pid-<worker pid>/<call id>/`` on its node
(one parent per worker process: concurrent workers never contend for one directory's lock
while they create and remove workspaces, which cost them 15 % more CPU). Every top-level
entry of the directory the worker started in (the unpacked runtime_env ``working_dir``, or the
driver's cwd when there is none) is symlinked into it, so code, Makefiles and inputs are visible;
the output trees are fresh, private, empty directories. The shared ``_ray_pkg_`` directory
itself is never written to.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import logging
import os
import sys
import tempfile
import threading
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import ray

from raysync import rayshim
from raysync.errors import TreeError
from raysync.fsops import remove_tree

if TYPE_CHECKING:
    from raysync.resuming import ResumedFrom

log = logging.getLogger("raysync")

#: Standard trees and the environment variable naming each one's absolute path.
TREE_ENV = {
    "export": "RAYSYNC_EXPORT_DIR",
    "data": "RAYSYNC_DATA_DIR",
    "artifacts": "RAYSYNC_ARTIFACTS_DIR",
}
WORKSPACE_ENV = "RAYSYNC_WORKSPACE"


@dataclass(frozen=True)
class Workspace:
    """A call's private directory. Use :func:`raysync.current_workspace` inside a call."""

    root: Path
    #: The directory whose entries are linked in; None when the worker's cwd does not exist.
    source: Path | None
    trees: tuple[str, ...]
    #: With ``resume=True``: the run and checkpoint this call's trees started from
    #: (``None``: a fresh start).
    resumed_from: ResumedFrom | None = None

    @property
    def export_dir(self) -> Path:
        return self.root / "export"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def artifacts_dir(self) -> Path:
        return self.root / "artifacts"

    def tree(self, name: str) -> Path:
        return self.root / name

    def env(self, extra: Mapping[str, str]) -> dict[str, str]:
        """The environment variables a call sees (``extra`` values are workspace-relative)."""
        root = str(self.root)
        out = {WORKSPACE_ENV: root}
        out.update({var: f"{root}/{tree}" for tree, var in TREE_ENV.items()})
        out.update({k: str(self.root / v) for k, v in extra.items()})
        # Subprocesses of the call must not write bytecode into the shared package either.
        out["PYTHONDONTWRITEBYTECODE"] = "1"
        out["PYTHONPYCACHEPREFIX"] = f"{root}/.pycache"
        return out


_current: contextvars.ContextVar[Workspace | None] = contextvars.ContextVar(
    "raysync_workspace", default=None
)
_warned_no_working_dir = False
_warn_lock = threading.Lock()


def current_workspace() -> Workspace:
    """The workspace of the decorated call running in this thread or task.

    Works in every mode, including ``chdir=False`` for threaded and async actors, where the
    process cwd is shared and code must use these paths instead of relative ones.
    """
    ws = _current.get()
    if ws is None:
        raise RuntimeError(
            "raysync.current_workspace() is only available inside a call "
            "decorated with @isolated_export"
        )
    return ws


_WORKING_DIR: dict[tuple[str, str], bool] = {}


def _has_working_dir() -> bool:
    if not rayshim.initialized():
        return False  # a direct call outside Ray: asking the runtime context would start Ray
    try:
        facts = rayshim.worker_facts()
        if facts is not None:
            job = (facts[3], facts[1])
        else:
            ctx = ray.get_runtime_context()
            job = (str(ctx.gcs_address), str(ctx.get_job_id()))
        found = _WORKING_DIR.get(job)
        if found is None:  # a job's runtime_env is fixed for its life (per cluster and job)
            ctx = ray.get_runtime_context()
            found = _WORKING_DIR[job] = bool(ctx.runtime_env.working_dir())
        return found
    except Exception:  # noqa: BLE001 - outside Ray, or an older runtime_env API
        return False


def _warn_no_working_dir(source: Path | None) -> None:
    global _warned_no_working_dir
    with _warn_lock:
        if _warned_no_working_dir:
            return
        _warned_no_working_dir = True
    if source is None:
        where = (
            "in a directory that does not exist on this node (the driver's files are not "
            "here). It runs in an empty private workspace"
        )
    else:
        where = (
            f"in {source} (the driver's directory on a single node, absent on other nodes). "
            "It runs in a private workspace that links to that directory; nothing is written "
            "into it"
        )
    warnings.warn(
        f"raysync: this task has no runtime_env working_dir, so it started {where}. Set "
        "runtime_env={'working_dir': '.'} (or raysync.runtime_env()) for a cluster-ready job.",
        RuntimeWarning,
        stacklevel=3,
    )


def _cwd() -> Path | None:
    """The process cwd, or None when it was deleted (or never existed on this node)."""
    try:
        return Path(os.getcwd())
    except FileNotFoundError:
        return None


def _base_dir() -> str:
    session = rayshim.session_dir()
    key = (session, os.getpid())  # a forked child has its own parent
    found = _BASES.get(key)
    if found is None:
        base = session if session is not None else tempfile.gettempdir()
        found = _BASES[key] = os.path.join(base, "raysync_workspaces", f"pid-{os.getpid()}")
        mine = Path(found)
        if mine not in _MINE:
            _MINE.add(mine)
            if len(_MINE) == 1:
                atexit.register(_remove_mine)
    return found


#: This process's workspace parents, removed (when empty) as it exits.
_MINE: set[Path] = set()
#: The workspace parent per (Ray session dir or ``None`` outside Ray, process id).
_BASES: dict[tuple[str | None, int], str] = {}


def _remove_mine() -> None:
    for d in _MINE:
        with contextlib.suppress(OSError):
            d.rmdir()


def create(call_id: str, trees: Sequence[str], source: Path | None = None) -> Workspace:
    """Make a fresh workspace for one call; ``source`` defaults to the process cwd.

    Plain strings and one pass over the source: this runs once per call, and its cost is
    paid by every short task (issue 20)."""
    src = source or _cwd()
    if not _has_working_dir():
        _warn_no_working_dir(src)
    root = os.path.join(_base_dir(), f"{call_id}-{uuid.uuid4().hex[:8]}")
    try:
        os.mkdir(root)
    except FileNotFoundError:
        os.makedirs(root)
    try:
        _fill(root, src, trees)
    except BaseException:
        remove_tree(root)
        raise
    return Workspace(root=Path(root), source=src, trees=tuple(trees))


def _fill(root: str, src: Path | None, trees: Sequence[str]) -> None:
    """Link the entries of ``src`` into ``root``, except the trees, made fresh and empty."""
    heads = {t.split("/", 1)[0] for t in trees}
    if src is not None:
        links: list[os.DirEntry[str]] = []
        with os.scandir(src) as it:
            for entry in it:
                if entry.name not in heads:
                    links.append(entry)
                elif _is_file(entry):
                    raise TreeError(
                        f"output tree {entry.name!r} is a file in the working directory {src}",
                        hint=f"rename {entry.name} or choose other trees= for isolated_export",
                    )
        for entry in links:
            os.symlink(entry.path, os.path.join(root, entry.name))
    for tree in trees:
        os.makedirs(os.path.join(root, tree), exist_ok=True)


def _is_file(entry: os.DirEntry[str]) -> bool:
    """A file or a link to one (as ``Path.exists() and not Path.is_dir()``: a dangling or
    looping link counts as absent)."""
    try:
        return not entry.is_dir() and os.path.exists(entry.path)
    except OSError:
        return False


def remove(ws: Workspace) -> None:
    """Delete a workspace (only after its export committed). Links are removed, not followed."""
    remove_tree(ws.root)


@contextlib.contextmanager
def activated(ws: Workspace, extra_env: Mapping[str, str], *, chdir: bool) -> Iterator[None]:
    """Make ``ws`` current; with ``chdir`` also set cwd and env, restoring both afterwards.

    The caller serialises chdir-mode calls in one process (cwd and env are process-wide).
    """
    token = _current.set(ws)
    if not chdir:
        try:
            yield
        finally:
            _current.reset(token)
        return
    old_cwd = _cwd()
    new_env = ws.env(extra_env)
    old_env = {k: os.environ.get(k) for k in new_env}
    old_bytecode = sys.dont_write_bytecode
    os.environ.update(new_env)
    sys.dont_write_bytecode = True
    os.chdir(ws.root)
    try:
        yield
    finally:
        # A cwd that did not exist cannot be restored: the workspaces' dir is the next best.
        os.chdir(old_cwd if old_cwd is not None else ws.root.parent)
        sys.dont_write_bytecode = old_bytecode
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _current.reset(token)
