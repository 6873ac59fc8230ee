"""The driver's own AWS credentials for ``credentials="driver"``, kept fresh.

When the options name no credentials, the driver resolves its own through botocore's chain
(environment, profile, ``credential_process``, SSO, instance or container role). Temporary
credentials (a role's, SSO's) expire within hours: a refresher thread in the driver asks
botocore for them again every ``RAYSYNC_CREDENTIALS_CHECK_SECONDS`` (60) and, when they
changed, hands the new ones to the signers (the driver's own and the actor). Presigned URLs
signed with the old ones fail once those expire; the worker's retry signs them again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Any

from raysync.redaction import redact, remember
from raysync_builtins.blob.store import log

#: Refreshers running in this driver, by (signer, destination): one each.
_LOCK = threading.Lock()
_RUNNING: dict[tuple[Any, ...], threading.Event] = {}


def resolve(options: Mapping[str, Any], drop: tuple[str, ...]) -> tuple[dict[str, Any], Any]:
    """The options (without ``drop``), with the driver's own credentials when they name
    none; and botocore's credentials object when those can change (else ``None``)."""
    out = {k: v for k, v in options.items() if k not in drop}
    if out.get("anon") or "key" in out or "aws_access_key_id" in out or "profile" in out:
        return out, None
    import botocore.session

    creds = botocore.session.get_session().get_credentials()
    if creds is None:
        return out, None
    out.update(_frozen(creds))
    refreshable = callable(getattr(creds, "refresh_needed", None))
    return out, creds if refreshable else None


def _frozen(creds: Any) -> dict[str, Any]:
    frozen = creds.get_frozen_credentials()
    got = {"key": frozen.access_key, "secret": frozen.secret_key}
    if frozen.token:
        got["token"] = frozen.token
    return got


def check_seconds() -> float:
    try:
        return max(0.1, float(os.environ.get("RAYSYNC_CREDENTIALS_CHECK_SECONDS", 60)))
    except ValueError:
        return 60.0


def keep_fresh(
    key: tuple[Any, ...],
    creds: Any,
    options: Mapping[str, Any],
    pushes: list[Callable[[dict[str, Any]], None]],
) -> None:
    """Start (once per ``key``) the thread that hands ``options`` with the credentials'
    current values to each of ``pushes`` whenever they change (a push that raises ``Stop``
    is dropped: its signer is gone). It stops with the driver (a daemon thread)."""
    with _LOCK:
        if key in _RUNNING:
            return
        stop = _RUNNING[key] = threading.Event()
    # What the signers hold now: the credentials in ``options`` (not a second read, which
    # could already be newer and so never be pushed).
    last = [{k: options[k] for k in ("key", "secret", "token") if k in options}]
    live = list(pushes)

    def run() -> None:
        while live and not stop.wait(check_seconds()):
            try:
                now = _frozen(creds)
            except Exception as e:  # noqa: BLE001 - tried again at the next check
                log.warning(
                    "raysync: could not refresh the driver's credentials: %s", redact(str(e))
                )
                continue
            if now == last[0]:
                continue
            fresh = {**options, **now}
            remember("", fresh)  # the new secret is redacted wherever it could show
            for push in list(live):
                try:
                    push(fresh)
                except Stop:
                    live.remove(push)
                except Exception as e:  # noqa: BLE001 - tried again at the next change
                    log.warning(
                        "raysync: could not hand fresh credentials to the signer: %s",
                        redact(str(e)),
                    )
            last[0] = now
        with _LOCK:
            _RUNNING.pop(key, None)

    threading.Thread(target=run, name="raysync-credentials", daemon=True).start()


class Stop(Exception):
    """Raised by a push whose signer is gone for good."""
