"""One redaction for every credential form (DESIGN.md invariant 5).

Credentials reach raysync in URIs (``s3://KEY:SECRET@bucket``, signed-URL query values) and
in ``storage_options`` (``secret``, ``token``, ``client_kwargs`` ...). Store clients repeat
them in their own error texts (a botocore message may quote the URL it was given). So every
error raysync raises from an export and every line it logs passes through :func:`redact`:

1. every secret a :class:`~raysync.target.Target` in this process was given is replaced by
   ``***`` wherever it appears, as written and percent-encoded;
2. the user-information part of any URI (``user:password@``, also when the password holds
   ``/`` or ``@``) and secret-looking query values are replaced too, for URIs this process
   has not seen as a target (a command-line argument, another library's message).

Use :func:`logger` for raysync's loggers: their records are redacted before any handler sees
them.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping
from typing import Any, TypeVar
from urllib.parse import quote, unquote, urlsplit

#: Option names (any part of them, case-insensitive) whose string values are secrets.
_SECRET_NAME = re.compile(
    r"secret|password|passwd|passphrase|token|credential|signature|sig$|key|auth|sas",
    re.IGNORECASE,
)
#: Option names that match the pattern above but hold no secret.
_NOT_SECRET = frozenset({"key_prefix", "sse_kms_key_id_alias"})
#: ``credentials="driver"`` names a mode; the word "driver" is no secret to scrub.
_CREDENTIAL_MODES = frozenset({"driver", "worker"})
#: Shorter strings are not scrubbed: they would mangle ordinary words in messages.
_MIN_SECRET = 4

_URI = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)([^\s'\"<>]*)")
_SECRET_QUERY = re.compile(
    r"([?&](?:[^=&\s]*(?:sig|signature|token|secret|key|password|credential)[^=&\s]*)=)"
    r"[^&\s'\"]*",
    re.IGNORECASE,
)

E = TypeVar("E", bound=BaseException)

_secrets: set[str] = set()
_lock = threading.Lock()


def _add(value: str) -> None:
    if len(value) < _MIN_SECRET:
        return
    forms = {value, quote(value, safe=""), quote(value, safe="/"), unquote(value)}
    with _lock:
        _secrets.update(f for f in forms if len(f) >= _MIN_SECRET)


def _walk_options(options: Mapping[str, Any], secret: bool = False) -> None:
    for k, v in options.items():
        name = str(k)
        if name == "credentials" and v in _CREDENTIAL_MODES:
            continue  # where credentials are kept (the fsspec backend's option), not one
        is_secret = secret or (bool(_SECRET_NAME.search(name)) and name not in _NOT_SECRET)
        if isinstance(v, Mapping):
            _walk_options(v, is_secret)
        elif isinstance(v, str) and is_secret:
            _add(v)
        elif isinstance(v, (list, tuple)) and is_secret:
            for item in v:
                if isinstance(item, str):
                    _add(item)


def remember(uri: str, options: Mapping[str, Any] | None = None) -> None:
    """Learn the secrets a target carries: its URI's user information and query values, and
    every string in ``options`` under a secret-looking name."""
    if options:
        _walk_options(options)
    scheme, sep, rest = uri.partition("://")
    if not sep or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.\-]*", scheme):
        return
    # The whole rest of the URI, not a match that stops at a space or a quote: a password
    # may hold either ('ftp://alice:s3cret pass@host/...').
    info = _userinfo(rest)
    if info:
        user, _, password = info.partition(":")
        if password:
            _add(password)
            _add(user)
        elif len(user) >= 16:
            _add(user)  # a token given as the user name (https://TOKEN@host/...)
    try:
        query = urlsplit(uri).query
    except ValueError:
        query = ""
    for part in query.split("&"):
        name, _, value = part.partition("=")
        if value and _SECRET_NAME.search(name):
            _add(value)


def _userinfo(rest: str) -> str | None:
    """The user-information part of a URI after its ``scheme://``: up to the last ``@``
    whose prefix holds a ``:`` (a password may hold ``/`` and ``@``) or holds no ``/``."""
    at = rest.rfind("@")
    while at != -1:
        info = rest[:at]
        if ":" in info or "/" not in info:
            return info
        at = rest.rfind("@", 0, at)
    return None


def _redact_uri(m: re.Match[str]) -> str:
    scheme, rest = m.group(1), m.group(2)
    info = _userinfo(rest)
    if info is not None:
        rest = "***@" + rest[len(info) + 1 :]
    return scheme + rest


def redact(text: str) -> str:
    """``text`` with every known secret and every URI credential replaced by ``***``."""
    with _lock:
        known = sorted(_secrets, key=len, reverse=True)
    for secret in known:
        if secret in text:
            text = text.replace(secret, "***")
    text = _URI.sub(_redact_uri, text)
    return _SECRET_QUERY.sub(r"\1***", text)


def redact_error(error: E) -> E:
    """Redact an exception's message in place (its ``args`` and raysync's own ``message``
    and ``hint``); returns it."""
    error.args = tuple(redact(a) if isinstance(a, str) else a for a in error.args)
    for attr in ("message", "hint", "uri"):
        value = getattr(error, attr, None)
        if isinstance(value, str):
            try:
                setattr(error, attr, redact(value))
            except AttributeError:
                pass
    return error


class RedactingFilter(logging.Filter):
    """Formats a record's message, redacted, so no handler sees a secret."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is logging's own problem
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and record.exc_info[1] is not None:
            redact_error(record.exc_info[1])
            record.exc_text = None
        return True


_FILTER = RedactingFilter()


def logger(name: str) -> logging.Logger:
    """A raysync logger whose records are redacted (use it instead of ``getLogger``)."""
    log = logging.getLogger(name)
    if _FILTER not in log.filters:
        log.addFilter(_FILTER)
    return log
