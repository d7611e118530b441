"""A hostile cloud for edge transport tests: a real loopback HTTP server with fixed answers.

``HostileServer({path: Answer(...)})`` listens on a loopback port the OS picks (https with
``tls``, a server-side ``ssl.SSLContext``) and answers each request whose path starts with a
key with that :class:`Answer` — any status, headers and body, sent at once or dripped piece by
piece — and records every request (method, path, headers, body) and when a client stopped
reading a body. ``gzip_zeros(n)`` is a gzip bomb:
``n`` zero bytes compressed about a thousand times.
"""

from __future__ import annotations

import functools
import ssl
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Answer:
    """One fixed answer. ``drip`` > 0 sends the body ``drip`` bytes at a time, ``pause_s``
    apart (no Content-Length: the body ends when the connection closes)."""

    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    drip: int = 0
    pause_s: float = 0.0


@dataclass
class Seen:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    gone_at: float | None = None  # monotonic time the client stopped reading a dripped body


class HostileServer:
    """A threaded loopback HTTP server answering fixed :class:`Answer` s by path prefix."""

    def __init__(self, routes: dict[str, Answer] | None = None,
                 tls: ssl.SSLContext | None = None) -> None:
        self.routes: dict[str, Answer] = dict(routes or {})
        self.seen: list[Seen] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

            do_POST = do_GET

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:  # https: each accepted connection does the handshake
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        scheme = "http" if tls is None else "https"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,),
                                        daemon=True)
        self._thread.start()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()

    def requests_to(self, prefix: str) -> list[Seen]:
        """The requests whose path starts with ``prefix``."""
        return [s for s in self.seen if s.path.startswith(prefix)]

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        seen = Seen(h.command, h.path, dict(h.headers.items()),
                    h.rfile.read(length) if length else b"")
        self.seen.append(seen)
        path = h.path.split("?")[0]
        answer = next((a for p, a in self.routes.items() if path.startswith(p)),
                      Answer(404, b'{"error": {"code": "not_found", "message": "no route"}}'))
        h.send_response_only(answer.status)
        for k, v in answer.headers.items():
            h.send_header(k, v)
        if not answer.drip:
            h.send_header("Content-Length", str(len(answer.body)))
            h.end_headers()
            try:
                h.wfile.write(answer.body)
            except OSError:  # the client stopped reading (as it should, for a bomb)
                seen.gone_at = time.monotonic()
                h.close_connection = True
            return
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        try:
            for at in range(0, len(answer.body), answer.drip):
                h.wfile.write(answer.body[at:at + answer.drip])
                h.wfile.flush()
                time.sleep(answer.pause_s)
        except OSError:  # the client hung up
            seen.gone_at = time.monotonic()


class _QuietServer(ThreadingHTTPServer):
    """Clients hanging up mid-body is what these tests provoke: no tracebacks for it."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


@functools.lru_cache(maxsize=4)
def gzip_zeros(n: int) -> bytes:
    """``n`` zero bytes as one gzip member (about ``n / 1030`` bytes)."""
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1 << 20)
    parts = [comp.compress(block) for _ in range(n >> 20)]
    parts.append(comp.compress(bytes(n & ((1 << 20) - 1))))
    parts.append(comp.flush())
    return b"".join(parts)


GZIP = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
