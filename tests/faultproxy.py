"""A small HTTP proxy on loopback that injects faults in front of a real S3 server (moto).

It forwards every request unchanged, except that it can answer ``503 SlowDown`` (or drop the
connection) for the first N requests or for a period of time, and it records the order of
requests so tests can check, e.g., that the manifest was the last object written.
"""

from __future__ import annotations

import http.client
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    def __init__(self, upstream: str, verify: Any = None) -> None:
        """``verify``: an object whose ``check(method, path, headers)`` returns ``None`` to
        forward the request or ``(status, body)`` to answer it (tests/sigv4.py)."""
        u = urlsplit(upstream)
        self.verify = verify
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.lock = threading.Lock()
        self.fail_next = 0  # answer 503 to this many requests
        self.fail_until = 0.0  # answer 503 until this monotonic time
        self.drop_next = 0  # close the connection without answering, this many times
        self.fail_matching: str | None = None  # limits the faults to paths it matches (re)
        self.fail_always = False
        self.fail_every = 0  # answer 503 to every n-th request (0: never)
        self.seen = 0
        self.log: list[tuple[str, str, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                action = proxy._decide(self.path)
                refused = (
                    proxy.verify.check(self.command, self.path, dict(self.headers.items()))
                    if proxy.verify
                    else None
                )
                if refused is not None:
                    proxy._record(self.command, self.path, refused[0])
                    self.send_response(refused[0])
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(refused[1])))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(refused[1])
                    return
                if action == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if action == "503":
                    proxy._record(self.command, self.path, 503)
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("connection", "keep-alive")
                }
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                proxy._record(self.command, self.path, resp.status)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # A HEAD answer has no body but the Content-Length of the object.
                length = resp.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _decide(self, path: str) -> str:
        with self.lock:
            # With fail_matching set, the counted faults apply only to matching requests.
            matches = self.fail_matching is None or re.search(self.fail_matching, path) is not None
            if self.drop_next > 0 and matches:
                self.drop_next -= 1
                return "drop"
            if self.fail_next > 0 and matches:
                self.fail_next -= 1
                return "503"
            if time.monotonic() < self.fail_until:
                return "503"
            if self.fail_always and self.fail_matching and matches:
                return "503"
            self.seen += 1
            if self.fail_every and self.seen % self.fail_every == 0:
                return "503"
        return "forward"

    def _record(self, method: str, path: str, status: int) -> None:
        with self.lock:
            self.log.append((method, path, status))

    def reset(self) -> None:
        with self.lock:
            self.fail_next = self.drop_next = 0
            self.fail_until = 0.0
            self.fail_matching, self.fail_always = None, False
            self.fail_every = self.seen = 0
            self.log.clear()

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
