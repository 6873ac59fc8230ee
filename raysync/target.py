"""Output URIs: scheme detection, ``{field}`` templates, driver-relative paths."""

from __future__ import annotations

import os
import posixpath
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from raysync.errors import TemplateError

#: Fields every call offers to an ``output_uri`` template, besides its own arguments.
BUILTIN_FIELDS = ("task_id", "job_id", "node_id", "attempt")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_FILE_SCHEME = "file"


def split_scheme(uri: str) -> tuple[str, str]:
    """``"s3://b/k"`` → ``("s3", "b/k")``; a plain path → ``("file", path)``."""
    m = _SCHEME.match(uri)
    if not m:
        return _FILE_SCHEME, uri
    return m.group(1).lower(), uri[m.end() :]


_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)[^/@]*@")
_SECRET_QUERY = re.compile(
    r"([?&](?:[^=&]*(?:sig|signature|token|secret|key|password|credential)[^=&]*)=)[^&]*",
    re.IGNORECASE,
)


def redact(uri: str) -> str:
    """Hide credentials a URI may carry (``user:pass@``, signed-URL query values)."""
    out = _USERINFO.sub(r"\1***@", uri)
    return _SECRET_QUERY.sub(r"\1***", out)


def template_fields(template: str) -> list[str]:
    """The top-level field names a template uses, e.g. ``{cfg.name}`` → ``cfg``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise TemplateError(f"malformed template: {e}", template=template) from e
    names = []
    for _, name, _, conversion in parsed:
        if name is None:
            continue
        if conversion not in (None, "r", "s", "a"):
            raise TemplateError(
                f"field {{{name}!{conversion}}} has an unknown conversion; use !s, !r or !a",
                template=template,
            )
        top = re.split(r"[.\[]", name, maxsplit=1)[0]
        if not top or top.isdigit():
            raise TemplateError(
                "positional fields like {} or {0} are not allowed; name the field",
                template=template,
                available=BUILTIN_FIELDS,
            )
        names.append(top)
    return names


def static_prefix(template: str) -> str:
    """The directory above a run: the template before its first field (or its last component),
    cut back to a ``/`` boundary. ``artifacts/runs/{id}`` → ``artifacts/runs``; ``out`` → ``""``."""
    head = template.split("{", 1)[0] if "{" in template else template.rstrip("/")
    if head.startswith("/") and head.count("/") == 1:
        return "/"
    return head.rsplit("/", 1)[0] if "/" in head else ""


def render(template: str, values: Mapping[str, Any], *, available: Iterable[str]) -> str:
    """Fill a template; every value must be a safe path segment sequence (no ``..``)."""
    used = template_fields(template)
    missing = [f for f in used if f not in values]
    if missing:
        raise TemplateError(
            f"template field {{{missing[0]}}} has no value in this call",
            template=template,
            available=available,
        )
    fmt = string.Formatter()
    out: list[str] = []
    for literal, name, spec, conversion in fmt.parse(template):
        out.append(literal)
        if name is None:
            continue
        try:
            obj, _ = fmt.get_field(name, (), values)
            text = fmt.format_field(fmt.convert_field(obj, conversion), spec or "")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            raise TemplateError(f"cannot render field {{{name}}}: {e}", template=template) from e
        parts = text.replace("\\", "/").split("/")
        if not text or text.startswith("/") or ".." in parts or "\x00" in text:
            raise TemplateError(
                f"value {text!r} of field {{{name}}} would move the destination "
                "outside its template (empty, absolute path, '..' or NUL)",
                template=template,
            )
        out.append(text)
    return "".join(out)


@dataclass(frozen=True)
class Target:
    """Where one decorated function's runs go, as the backend sees it.

    ``uri`` is the template as written (it may hold ``{field}`` placeholders) or, inside
    :class:`raysync.backend.ExportRequest`, the rendered URI of one call.
    ``base_dir`` is the driver's cwd, against which relative paths resolve (``None`` until the
    driver's facts are known).
    """

    uri: str
    scheme: str
    # Options may hold credentials: never in a repr (DESIGN invariant 5).
    options: Mapping[str, Any] = field(default_factory=dict, repr=False)
    base_dir: str | None = None

    @classmethod
    def parse(cls, uri: str, options: Mapping[str, Any] | None = None) -> Target:
        scheme, _ = split_scheme(uri)
        return cls(uri=uri, scheme=scheme, options=dict(options or {}))

    @property
    def path(self) -> str:
        """The URI without its scheme."""
        return split_scheme(self.uri)[1]

    @property
    def root(self) -> str:
        """The static part of the path (before any field), as a URI path."""
        return static_prefix(self.path)

    def local_path(self, path: str | None = None) -> str:
        """Resolve a filesystem path against the driver's cwd, never the worker's."""
        p = self.path if path is None else path
        if os.path.isabs(p):
            return posixpath.normpath(p)
        if self.base_dir is None:
            raise TemplateError(
                "a relative destination needs the driver's cwd, which is not known here; "
                "import raysync in the driver before ray.init() or use an absolute path",
                template=self.uri,
            )
        return posixpath.normpath(posixpath.join(self.base_dir, p))

    def with_uri(self, uri: str) -> Target:
        return replace(self, uri=uri)
