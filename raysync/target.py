"""Output URIs: scheme detection, ``{field}`` templates, driver-relative paths."""

from __future__ import annotations

import functools
import os
import posixpath
import re
import string
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import unquote

from raysync.errors import TemplateError
from raysync.redaction import redact as redact  # re-exported: older imports use it
from raysync.redaction import remember

#: Fields every call offers to an ``output_uri`` template, besides its own arguments.
BUILTIN_FIELDS = ("call_id", "task_id", "job_id", "node_id", "attempt")

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_FILE_SCHEME = "file"


def split_scheme(uri: str) -> tuple[str, str]:
    """``"s3://b/k"`` → ``("s3", "b/k")``; a plain path → ``("file", path)``."""
    m = _SCHEME.match(uri)
    if not m:
        return _FILE_SCHEME, uri
    return m.group(1).lower(), uri[m.end() :]


def template_fields(template: str) -> list[str]:
    """The top-level field names a template uses, e.g. ``{cfg.name}`` → ``cfg``."""
    return list(_template_fields(template))


@functools.lru_cache(maxsize=256)
def _template_fields(template: str) -> tuple[str, ...]:
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
    return tuple(names)


def static_prefix(template: str) -> str:
    """The directory above a run: the template before its first field (or its last component),
    cut back to a ``/`` boundary. ``artifacts/runs/{id}`` → ``artifacts/runs``; ``out`` → ``""``."""
    head = template.split("{", 1)[0] if "{" in template else template.rstrip("/")
    if head.startswith("/") and head.count("/") == 1:
        return "/"
    return head.rsplit("/", 1)[0] if "/" in head else ""


_FORMATTER = string.Formatter()


@functools.lru_cache(maxsize=256)
def _parsed(template: str) -> tuple[tuple[str, str | None, str | None, str | None], ...]:
    """``template`` parsed once (every call of a decorated function renders the same one)."""
    return tuple(_FORMATTER.parse(template))


def render(template: str, values: Mapping[str, Any], *, available: Iterable[str]) -> str:
    """Fill a template; every value must be a safe path segment sequence (no ``..``)."""
    used = _template_fields(template)
    missing = [f for f in used if f not in values]
    if missing:
        raise TemplateError(
            f"template field {{{missing[0]}}} has no value in this call",
            template=template,
            available=available,
        )
    fmt = _FORMATTER
    out: list[str] = []
    for literal, name, spec, conversion in _parsed(template):
        out.append(literal)
        if name is None:
            continue
        try:
            obj, _ = fmt.get_field(name, (), values)
            text = fmt.format_field(fmt.convert_field(obj, conversion), spec or "")
        except (AttributeError, IndexError, KeyError, TypeError, ValueError) as e:
            raise TemplateError(f"cannot render field {{{name}}}: {e}", template=template) from e
        problem = value_problem(text)
        if problem:
            raise TemplateError(
                f"value {text!r} of field {{{name}}} cannot name a run: {problem}",
                template=template,
            )
        out.append(text)
    rendered = "".join(out)
    if template:  # "" is return-by-value: there is no destination
        check_run_path(template, rendered)
    return rendered


#: A first path segment that starts like a URI scheme: ``s3:``, ``simplecache::s3:``, ``gs:x``.
_SCHEME_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


def check_uri_form(uri: str) -> None:
    """At decoration: a URI either has a scheme the registry resolves (``s3://...``) or is a
    plain path. What looks like a URI but is not one (``s3:/bucket/x``, ``s3:bucket``, an
    fsspec chained URL ``simplecache::s3://...``) is refused: read as a path, it would become
    a local directory named after the URL, and the files would not be where the user looks."""
    if _SCHEME.match(uri) or not _SCHEME_LIKE.match(uri):
        return
    first = uri.split("/", 1)[0]
    if "::" in uri.split("://", 1)[0]:
        raise TemplateError(
            "fsspec chained URLs (a::b://...) are not an output_uri raysync can commit to: "
            "the run would land in a cache or an archive, not where the URL's last part says",
            template=uri,
            hint=f"write the store's own URL, e.g. {uri.split('::')[-1]!r}",
        )
    scheme = first.split(":", 1)[0]
    raise TemplateError(
        f"{first!r} looks like the start of a {scheme}:// URI but is not one (a URI needs "
        "'://'); as a path it would be a local directory named after it",
        template=uri,
        hint=f"write {scheme}://... for the store, or ./{uri} for a local directory",
    )


def check_template(template: str) -> None:
    """At decoration: refuse a template whose written parts already cannot name a run (the
    root itself, or a ``.``, ``..`` or empty segment below it), whatever its fields hold."""
    if not template:
        return
    parts = list(string.Formatter().parse(template))
    shape = "".join(literal + ("x" if name is not None else "") for literal, name, _, _ in parts)
    try:
        check_run_path(template, shape)
    except TemplateError as e:
        if all(name is None for _, name, _, _ in parts):
            raise  # no fields: the message names the destination exactly
        raise TemplateError(
            "whatever its fields hold, this template cannot name a run: its written parts "
            "hold a '.', '..' or empty segment below its root",
            template=template,
            hint=e.hint,
        ) from None


#: How many rounds of percent-decoding a value is checked through (``%252e`` → ``%2e`` → ``.``).
_DECODINGS = 3


def _decoded_forms(text: str) -> list[str]:
    """``text`` and what every round of percent-decoding makes of it: backends decode URIs
    (rsync and fsspec URLs), so a value is checked as each of them will read it."""
    forms = [text]
    for _ in range(_DECODINGS):
        nxt = unquote(forms[-1], errors="surrogateescape")
        if nxt == forms[-1]:
            break
        forms.append(nxt)
    return forms


def control_chars(text: str) -> list[str]:
    """The control characters in ``text`` (C0, DEL, C1): never part of a run name."""
    return sorted({c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0})


def value_problem(text: str) -> str | None:
    """Why a field value cannot be part of a run's path, or ``None`` when it can.

    Checked as written and after every percent-decoding a backend may apply: no empty value,
    no absolute path, no ``.``, ``..`` or empty segment (``/`` and ``\\`` separate segments),
    no control character (a newline would forge rows in listings), no ``::`` (fsspec reads
    it as a chain of file systems), no segment naming raysync's own hidden files
    (``.raysync...``: staging directories, shard areas, locks)."""
    if not text:
        return "it is empty"
    for form in _decoded_forms(text):
        bad = control_chars(form)
        if bad:
            return f"it holds control characters {bad!r}"
        unified = form.replace("\\", "/")
        if unified.startswith("/"):
            return "it is an absolute path"
        parts = unified.split("/")
        if any(p in ("", ".", "..") for p in parts):
            return "it has a '.', '..' or empty path segment (after percent-decoding)"
        if any(p.startswith(".raysync") or ".raysync-" in p for p in parts):
            return "it names raysync's own hidden files ('.raysync...'), which runs never use"
        if "::" in form:
            return "it holds '::' (a chained fsspec URL)"
    return None


def check_run_path(template: str, rendered: str) -> None:
    """A rendered URI must name a run strictly below its template's static root, with no
    ``.``, ``..`` or empty segment past that root and no control character anywhere (as
    written and percent-decoded). So a run is never the root itself or above it: exporting
    there with ``conflict="overwrite"`` would replace every sibling run, or the project."""
    path = split_scheme(rendered)[1]
    root = static_prefix(split_scheme(template)[1])
    for form in _decoded_forms(path):
        bad = control_chars(form)
        if bad:
            raise TemplateError(
                f"the destination {redact(rendered)!r} holds control characters {bad!r}",
                template=template,
            )
    prefix = root if root in ("", "/") else root + "/"
    tail = path[len(prefix) :].rstrip("/") if path.startswith(prefix) else ""
    if not tail:
        raise TemplateError(
            f"the destination {redact(rendered)!r} is the template's root directory "
            f"{root or '.'!r} (or above it), not a run inside it",
            template=template,
            hint="give the run its own name below the root, e.g. 'runs/{name}'",
        )
    for form in _decoded_forms(tail):
        if any(p in ("", ".", "..") for p in form.replace("\\", "/").split("/")):
            raise TemplateError(
                f"the destination {redact(rendered)!r} has a '.', '..' or empty segment "
                f"below its root {root or '.'!r}",
                template=template,
                hint="write the run's path without '.', '..' or '//' segments",
            )


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

    def __post_init__(self) -> None:
        # Every secret a target carries is known to the redaction from here on, so no error
        # or log line of this process shows it (DESIGN invariant 5).
        remember(self.uri, self.options)

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
