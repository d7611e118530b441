"""A fault-injecting HTTP proxy on loopback, for the fault tests.

``FaultProxy(upstream).start()`` forwards every request to ``upstream`` (one fresh upstream
connection per request) and applies the first matching :class:`Fault` on the way back: cut the
body after N bytes and close, flip a byte, serve a shorter body, delay, drip the body slowly,
answer an HTTP error, drop the connection, or rewrite the body. Every exchange is recorded in
``proxy.log`` (method, path, request headers, status, body bytes sent) so a test can check what
the client asked for, e.g. that a resumed download sent ``Range: bytes=N-``.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te",
              "trailer", "upgrade", "content-length", "host"}


@dataclass
class Fault:
    """What to do to responses whose path contains ``path`` (all paths when empty).

    ``times`` limits how many matching requests are hit (None: all of them). Several effects
    may be combined; they apply in this order: ``delay_s``, ``drop``, ``status``, ``reroute``
and ``identity`` (upstream request), ``transform``,
    ``truncate_to``, ``flip_at``, ``cut_after``/``drip_s``.
    """

    path: str = ""
    times: int | None = None
    delay_s: float = 0.0          # sleep before answering
    drop: bool = False            # close the connection without an answer
    status: int | None = None     # answer this HTTP status with a JSON error body
    transform: Callable[[bytes], bytes] | None = None  # rewrite the body (e.g. a manifest)
    truncate_to: int | None = None  # serve only this many bytes, with a matching length
    flip_at: int | None = None    # xor 0xFF the body byte at this offset (negative: from end)
    cut_after: int | None = None  # promise the whole length, send N bytes, then close
    drip_s: float = 0.0           # send the body one byte at a time, sleeping between bytes
    identity: bool = False        # strip Accept-Encoding upstream: no gzip from the cloud
    reroute: tuple[str, str] | None = None  # (old, new): rewrite the upstream request path
    hits: int = 0

    def matches(self, path: str) -> bool:
        """True if this fault applies to ``path`` now."""
        return self.path in path and (self.times is None or self.hits < self.times)


@dataclass
class Exchange:
    """One request through the proxy and what was sent back."""

    method: str
    path: str
    headers: dict[str, str]
    status: int
    response_headers: dict[str, str] = field(default_factory=dict)
    body_sent: bytes = b""
    fault: bool = False


class FaultProxy:
    """A threaded loopback proxy in front of ``upstream`` (``http://127.0.0.1:PORT``)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream_host = parts.hostname or "127.0.0.1"
        self.upstream_port = parts.port or 80
        self.faults: list[Fault] = []
        self.log: list[Exchange] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """Base URL of the proxy."""
        assert self._server is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def add(self, fault: Fault) -> Fault:
        """Install ``fault`` (first match wins) and return it."""
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        """Remove every fault: forward faithfully from now on."""
        with self._lock:
            self.faults.clear()

    def requests_to(self, path: str) -> list[Exchange]:
        """Recorded exchanges whose path contains ``path``."""
        with self._lock:
            return [e for e in self.log if path in e.path]

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for f in self.faults:
                if f.matches(path):
                    f.hits += 1
                    return f
        return None

    def _record(self, ex: Exchange) -> None:
        with self._lock:
            self.log.append(ex)

    def start(self) -> FaultProxy:
        """Listen on a free loopback port in a daemon thread."""
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # keep test output quiet

            def do_GET(self) -> None:
                proxy._handle(self)

            do_POST = do_HEAD = do_PUT = do_DELETE = do_GET

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening (clients then get 'connection refused')."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------------------- forwarding
    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        headers = {k: v for k, v in h.headers.items()}
        length = int(h.headers.get("Content-Length") or 0)
        req_body = h.rfile.read(length) if length else b""
        fault = self._take_fault(h.path)
        ex = Exchange(h.command, h.path, headers, 0, fault=fault is not None)
        self._record(ex)
        if fault is not None and fault.delay_s:
            time.sleep(fault.delay_s)
        if fault is not None and fault.drop:
            _hard_close(h)
            return
        if fault is not None and fault.status is not None:
            body = json.dumps({"error": {"code": "injected", "message":
                                         f"fault proxy answered {fault.status}"}}).encode()
            self._answer(h, ex, fault.status, {"Content-Type": "application/json"}, body)
            return
        up_headers = {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}
        if fault is not None and fault.identity:
            up_headers = {k: v for k, v in up_headers.items() if k.lower() != "accept-encoding"}
            up_headers["Accept-Encoding"] = "identity"
        up_path = h.path
        if fault is not None and fault.reroute is not None:
            up_path = up_path.replace(*fault.reroute)
        try:
            conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)
            conn.request(h.command, up_path, body=req_body or None, headers=up_headers)
            resp = conn.getresponse()
            body = resp.read()
            status, resp_headers = resp.status, {k: v for k, v in resp.getheaders()
                                                 if k.lower() not in HOP_BY_HOP}
            conn.close()
        except OSError:
            _hard_close(h)  # the upstream is down: look like it to the client
            return
        if fault is not None and fault.transform is not None:
            body = fault.transform(body)
        if fault is not None and fault.truncate_to is not None:
            body = body[:fault.truncate_to]
        if fault is not None and fault.flip_at is not None and body:
            b = bytearray(body)
            b[fault.flip_at] ^= 0xFF
            body = bytes(b)
        self._answer(h, ex, status, resp_headers, body, fault)

    def _answer(self, h: BaseHTTPRequestHandler, ex: Exchange, status: int,
                headers: dict[str, str], body: bytes, fault: Fault | None = None) -> None:
        ex.status, ex.response_headers = status, headers
        h.send_response_only(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if h.command == "HEAD":
            h.wfile.flush()
            return
        send = body
        if fault is not None and fault.cut_after is not None:
            send = body[:fault.cut_after]
        try:
            if fault is not None and fault.drip_s:
                for i in range(len(send)):
                    h.wfile.write(send[i:i + 1])
                    h.wfile.flush()
                    ex.body_sent = send[:i + 1]
                    time.sleep(fault.drip_s)
            else:
                h.wfile.write(send)
                h.wfile.flush()
                ex.body_sent = send
        except OSError:
            h.close_connection = True
            return
        if len(send) < len(body):
            _hard_close(h)


def _hard_close(h: BaseHTTPRequestHandler) -> None:
    """Close the client connection now, mid-response if need be."""
    h.close_connection = True
    try:
        h.wfile.flush()
        h.connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
