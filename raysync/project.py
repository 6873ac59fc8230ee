"""``raysync.runtime_env()``: a valid Ray runtime_env for a project directory.

The seed wrote ``{"working_dir": ".", "pip": ["./pyproject.toml"]}``; Ray does not accept a
pyproject.toml in ``pip``. This builds what Ray does accept: the project as ``working_dir``,
``excludes`` that keep outputs, virtualenvs, VCS and cache directories out of the package
Ray uploads, and ``pip`` as the requirement strings of ``[project.dependencies]``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from raysync.errors import ConfigError, MissingDependencyError

#: The output trees isolated_export collects by default.
DEFAULT_TREES = ("export", "data", "artifacts")
#: Directories that never belong in a working_dir upload.
ALWAYS_EXCLUDED = (
    ".git/",
    ".hg/",
    ".svn/",
    ".venv/",
    "venv/",
    "__pycache__/",
    "*.pyc",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".tox/",
    ".nox/",
    "*.egg-info/",
    "build/",
    "dist/",
)


def _load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise MissingDependencyError(
                "reading pyproject.toml on Python 3.10", package="tomli"
            ) from e
    try:
        with open(path, "rb") as f:
            return dict(tomllib.load(f))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from e


def project_dependencies(project: Path) -> list[str]:
    """The requirement strings of ``[project.dependencies]`` in ``project/pyproject.toml``."""
    doc = _load_toml(project / "pyproject.toml")
    deps = doc.get("project", {}).get("dependencies", [])
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise ConfigError(
            f"{project / 'pyproject.toml'}: [project] dependencies must be a list of strings"
        )
    return list(deps)


def runtime_env(
    project: str | Path = ".",
    *,
    trees: Iterable[str] = DEFAULT_TREES,
    excludes: Iterable[str] = (),
    pip: bool | Iterable[str] = True,
    env_vars: Mapping[str, str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A Ray ``runtime_env`` for ``project`` (a directory; default the current one).

    - ``working_dir``: the project's absolute path;
    - ``excludes``: the output ``trees`` at the project's top level (``/export/``, ...), every
      virtualenv at the top level (a directory holding ``pyvenv.cfg``), VCS and cache
      directories (:data:`ALWAYS_EXCLUDED`), then your own ``excludes``; gitignore syntax;
    - ``pip``: with ``pip=True``, ``[project.dependencies]`` from ``pyproject.toml`` when the
      project has one with dependencies (no key otherwise); or your own list; ``False`` for
      none;
    - ``env_vars`` and any other runtime_env field (``extra``) are passed through.

    ``ray.init(runtime_env=raysync.runtime_env())`` is the usual call.
    """
    root = Path(project).resolve()
    if not root.is_dir():
        raise ConfigError(
            f"the project directory {root} does not exist",
            hint="pass the directory that holds your code and inputs",
        )
    out: list[str] = [f"/{t.strip('/')}/" for t in trees]
    for child in sorted(root.iterdir()):
        if child.is_dir() and (child / "pyvenv.cfg").exists():
            out.append(f"/{child.name}/")
    out += [e for e in ALWAYS_EXCLUDED if e not in out]
    out += [e for e in excludes if e not in out]
    env: dict[str, Any] = {"working_dir": str(root), "excludes": out}
    if pip is True:
        if (root / "pyproject.toml").exists():
            deps = project_dependencies(root)
            if deps:
                env["pip"] = deps
    elif pip is not False:
        env["pip"] = list(pip)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    env.update(extra)
    return env
