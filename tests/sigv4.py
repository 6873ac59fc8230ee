"""Checks AWS Signature V4 as S3 does, for the proxy in front of moto (which checks none).

moto accepts any request, signed or not, so a test that a worker without credentials cannot
write where its presigned URLs do not reach needs a server that verifies signatures: the
:class:`tests.faultproxy.FaultProxy` with ``verify=SigV4(key_id, secret)`` answers 403 (the
store's own error codes) to an unsigned request, a wrong signature, another key id, or an
expired presigned URL, and forwards the rest to moto.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from calendar import timegm
from collections.abc import Mapping
from urllib.parse import quote, unquote, urlsplit


def _error(code: str, message: str) -> tuple[int, bytes]:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
        f"<Message>{message}</Message></Error>"
    )
    return 403, body.encode()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


class SigV4:
    """A verifier for one access key: ``check(method, raw_path, headers)`` is ``None`` for a
    valid request, else the (status, body) the store would answer."""

    def __init__(self, key_id: str, secret: str) -> None:
        self.key_id, self.secret = key_id, secret
        self.refused: list[tuple[str, str, str]] = []  # (method, path, code)

    def check(self, method: str, raw: str, headers: Mapping[str, str]) -> tuple[int, bytes] | None:
        got = self._check(method, raw, {k.lower(): v for k, v in headers.items()})
        if got is not None:
            self.refused.append((method, raw, got[1].decode().split("<Code>")[1].split("<")[0]))
        return got

    def _check(self, method: str, raw: str, headers: dict[str, str]) -> tuple[int, bytes] | None:
        parts = urlsplit(raw)
        pairs = [p.partition("=") for p in parts.query.split("&") if p]
        query = {unquote(k): unquote(v) for k, _, v in pairs}
        auth = headers.get("authorization", "")
        if "X-Amz-Signature" in query:
            signature = query["X-Amz-Signature"]
            credential = query.get("X-Amz-Credential", "")
            signed = query.get("X-Amz-SignedHeaders", "")
            amz_date = query.get("X-Amz-Date", "")
            payload = "UNSIGNED-PAYLOAD"
            try:
                t0 = timegm(time.strptime(amz_date, "%Y%m%dT%H%M%SZ"))
                expires = int(query.get("X-Amz-Expires", "0"))
            except ValueError:
                return _error("AuthorizationQueryParametersError", "bad X-Amz-Date")
            if time.time() > t0 + expires:
                return _error("AccessDenied", "Request has expired")
            kept = [(k, v) for k, _, v in pairs if unquote(k) != "X-Amz-Signature"]
        elif auth.startswith("AWS4-HMAC-SHA256 "):
            fields = dict(
                f.strip().partition("=")[::2] for f in auth[len("AWS4-HMAC-SHA256 ") :].split(",")
            )
            signature = fields.get("Signature", "")
            credential = fields.get("Credential", "")
            signed = fields.get("SignedHeaders", "")
            amz_date = headers.get("x-amz-date", "")
            payload = headers.get("x-amz-content-sha256", "UNSIGNED-PAYLOAD")
            kept = [(k, v) for k, _, v in pairs]
        else:
            return _error("AccessDenied", "Anonymous access is forbidden")
        key_id, _, scope = credential.partition("/")
        if key_id != self.key_id:
            return _error("InvalidAccessKeyId", "The AWS Access Key Id does not exist")
        canonical_query = "&".join(
            f"{quote(unquote(k), safe='-_.~')}={quote(unquote(v), safe='-_.~')}"
            for k, v in sorted((quote(unquote(k), safe="-_.~"), v) for k, v in kept)
        )
        names = signed.split(";")
        canonical_headers = "".join(f"{n}:{' '.join(headers.get(n, '').split())}\n" for n in names)
        canonical = "\n".join(
            [
                method,
                quote(unquote(parts.path), safe="/~"),
                canonical_query,
                canonical_headers,
                signed,
                payload,
            ]
        )
        to_sign = "\n".join(
            [
                "AWS4-HMAC-SHA256",
                amz_date,
                scope,
                hashlib.sha256(canonical.encode()).hexdigest(),
            ]
        )
        date, region, service, _ = ([*scope.split("/"), "", "", "", ""])[:4]
        key = _hmac(("AWS4" + self.secret).encode(), date)
        for part in (region, service, "aws4_request"):
            key = _hmac(key, part)
        expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, signature):
            return _error("SignatureDoesNotMatch", "The request signature does not match")
        return None
