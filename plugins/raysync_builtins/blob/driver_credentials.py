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

from raysync_builtins.blob.store import log

#: Refreshers running in this driver, by (signer, destination): one each.
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
    push: Callable[[dict[str, Any]], None],
) -> None:
    """Start (once per ``key``) the thread that pushes ``options`` with the credentials'
    current values whenever they change. It stops with the driver (a daemon thread)."""
    if key in _RUNNING:
        return
    stop = _RUNNING[key] = threading.Event()
    last = [_frozen(creds)]

    def run() -> None:
        while not stop.wait(check_seconds()):
            try:
                now = _frozen(creds)
                if now != last[0]:
                    push({**options, **now})
                    last[0] = now
            except Exception as e:  # noqa: BLE001 - tried again at the next check
                if "Actor" in type(e).__name__:  # its signer is gone (a new cluster): done
                    _RUNNING.pop(key, None)
                    return
                log.warning("raysync: could not refresh the driver's credentials: %s", e)

    threading.Thread(target=run, name="raysync-credentials", daemon=True).start()
