"""The buffering front of :class:`hybridml.cloud.serve.SheddingWorker`: what nginx would do in
front of gunicorn, done on the worker's main thread, so a slow client never holds a thread.

A connection is always in one of these states; only RUNNING holds a thread, and no thread
ever waits for a client::

    accept ──► READING ──(request whole)──► RUNNING ──► WRITING ──► KEPT ──(bytes)──┐
                 ▲ │  non-blocking reads on      │  gunicorn parses the    gunicorn's  │
                 │ │  the main thread's selector │  buffered bytes, runs   idle keep-  │
                 │ │  (framing: hybridml.cloud.  │  the app and writes     alive wait  │
                 │ │  framing) until whole       │  through WriteBehind                │
                 │ ▼                             ▼                                     │
                 │ CLOSING ◄── 408 past request_timeout_s, 413/431 over a limit, a     │
                 │             response not read for send_timeout_s, Connection: close │
                 └──────────── not whole ◄── TAKE: one non-blocking read in a thread ◄─┘

* READING: ``Content-Length`` or chunked bodies are read whole before a thread sees the
  request; the bytes are handed to gunicorn's parser with ``parser.unreader.unread()``, and
  what a client pipelined behind a request comes back here after its answer.
* TAKE: a kept-alive connection's next request almost always arrives in one packet, so a
  thread reads it as gunicorn does, but once and without waiting (:meth:`Front.take`);
  anything short of a whole request goes back to READING with the bytes read. This keeps
  the hot path as cheap as gunicorn's own (reading every request on the main thread cost
  ~5% of throughput: its ``recv`` gives up the GIL and waits to get it back).
* WRITING: a thread writes a response through a :class:`~hybridml.cloud.writebehind.
  WriteBehind`, which sends what the peer takes at once and keeps the rest (bytes, or a
  duplicated descriptor and an offset for ``sendfile``) for the main thread to send when
  the socket is writable.
* CLOSING: a lingering close: FIN, then the peer's unread bytes are drained for a short
  while, so that closing does not turn into a reset that destroys the last response.

Plain sockets only: with TLS or HTTP/2 (a later issue) the worker runs gunicorn's own
thread-per-read model (``SheddingWorker.front`` is None).
"""

from __future__ import annotations

import contextlib
import http
import json
import logging
import socket
import time
from collections import OrderedDict, deque
from functools import partial
from selectors import EVENT_READ, EVENT_WRITE
from typing import Any

from gunicorn import util
from gunicorn.workers import gthread

from hybridml.shared.errors import HTTPError

from . import framing
from .config import ServeConfig
from .writebehind import WriteBehind

log = logging.getLogger("hybridml.cloud.front")
RECV_SIZE = 65536
_DONTWAIT = socket.MSG_DONTWAIT
LINGER_S = 2.0  # as gunicorn's close_graceful, but without blocking the main thread
LINGER_MAX = 65536
# A connection just accepted counts as load for this long or until its first bytes: a
# burst of connects (a client pool opening) is then spread over the workers, as when each
# new connection went straight to a thread. Silent ones stop counting: they cost no thread.
FRESH_S = 0.02
# How long a stopping worker keeps idle connections (gunicorn 27's, where it exists).
STOP_LINGER_S = getattr(gthread, "STOP_KEEPALIVE_LINGER", 2.0)


class _Reading:
    """A request being read on the main thread."""

    __slots__ = ("buf", "conn", "continued", "deadline", "framing", "fresh", "registered",
                 "since")

    def __init__(self, conn: Any, since: float, deadline: float, max_head: int,
                 max_body: int) -> None:
        self.conn, self.since, self.deadline = conn, since, deadline
        self.buf: bytes | bytearray = b""
        self.framing = framing.Framing(max_head, max_body)
        self.registered = self.continued = self.fresh = False

    def add(self, data: bytes) -> None:
        if not self.buf:
            self.buf = data.lstrip(b"\r\n")  # RFC 9112 §2.2: empty lines before a request
        else:
            if isinstance(self.buf, bytes):
                self.buf = bytearray(self.buf)  # appends in place from here: no quadratic copy
            self.buf += data


class Front:
    """The main thread's side of every connection of one worker (see the module docstring).

    ``worker`` is the gthread worker: its ``poller``, ``enqueue_req``, ``keepalived_conns``,
    ``nr_conns`` and ``alive`` are used as gunicorn's own main loop uses them.
    """

    def __init__(self, worker: Any, limits: ServeConfig) -> None:
        self.worker = worker
        self.limits = limits
        # Deadlines in the order they fall: each map is filled with now + a fixed delay.
        self.reading: OrderedDict[Any, _Reading] = OrderedDict()
        self.writing: OrderedDict[Any, tuple[float, WriteBehind, bool]] = OrderedDict()
        self.closing: OrderedDict[Any, tuple[float, int]] = OrderedDict()
        self.fresh = 0  # connections accepted less than FRESH_S ago that sent nothing yet
        self._fresh: deque[_Reading] = deque()

    # ------------------------------------------------------------------------- reading
    def take(self, conn: Any) -> bool | None:
        """In a thread: read a kept-alive connection's next request, without waiting.

        True: the request is whole and in gunicorn's parser. False: it is not; the bytes
        read are kept for :meth:`resume` on the main thread. None: the peer closed. The
        common case (the whole request came in one packet) thus costs what gunicorn's own
        keep-alive path costs, and a slow request holds the thread for one read only.
        Thread-safe: it uses the connection and the (frozen) limits only.
        """
        try:
            data = conn.sock.recv(RECV_SIZE, _DONTWAIT)
        except (BlockingIOError, InterruptedError):
            data = b""  # nothing yet: a wake-up without bytes
        except OSError:
            return None
        else:
            if not data:
                return None
        limits = self.limits
        buf = data.lstrip(b"\r\n")
        if buf and len(data) < RECV_SIZE and framing.Framing(
                limits.max_header_bytes, limits.max_body_bytes).scan(buf) == framing.READY:
            conn.parser.unreader.unread(buf)
            return True
        conn.hybridml_partial = data
        return False

    def resume(self, conn: Any) -> None:
        """Go on reading a request a thread began (:meth:`take` said False)."""
        data, conn.hybridml_partial = conn.hybridml_partial, b""
        self.begin(conn, data)

    def accepted(self, conn: Any) -> None:
        """Read the first request of a new connection."""
        self.begin(conn, fresh=True)

    def begin(self, conn: Any, data: bytes = b"", fresh: bool = False) -> None:
        """Read a request on ``conn``: new, kept-alive and readable, or with bytes pipelined."""
        limits = self.limits
        now = time.monotonic()
        r = _Reading(conn, now, now + limits.request_timeout_s, limits.max_header_bytes,
                     limits.max_body_bytes)
        if fresh:
            r.fresh = True
            self.fresh += 1
            self._fresh.append(r)
        if data:
            r.add(data)
            verdict = r.framing.scan(r.buf) if r.buf else framing.MORE
            if verdict != framing.MORE:
                self._judge(r, verdict)
                return
        self._read(r)

    def _readable(self, r: _Reading, _sock: Any) -> None:
        self._read(r)

    def _read(self, r: _Reading) -> None:
        verdict = framing.MORE
        while verdict == framing.MORE:
            try:
                data = r.conn.sock.recv(RECV_SIZE, _DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:  # the peer closed, or reset
                self._forget(r)
                self.close_now(r.conn)
                return
            r.add(data)
            self._unfresh(r)
            if r.buf:
                verdict = r.framing.scan(r.buf)
            if len(data) < RECV_SIZE:
                break  # the socket is drained: wait for the selector
        self._judge(r, verdict)

    def _judge(self, r: _Reading, verdict: int) -> None:
        if verdict == framing.MORE:
            if r.framing.expects_continue and not r.continued:
                r.continued = True
                _send_now(r.conn.sock, framing.CONTINUE)  # 25 bytes to an idle socket
            if not r.registered:  # waiting: on the selector, with a deadline
                r.registered = True
                self.reading[r.conn] = r
                self.worker.poller.register(r.conn.sock, EVENT_READ, partial(self._readable, r))
            return
        self._forget(r)
        if verdict == framing.READY:
            conn = r.conn
            conn.init()  # gunicorn's parser, on first use (blocking socket: for the thread)
            conn.parser.unreader.unread(bytes(r.buf))
            self.worker.enqueue_req(conn)
        elif verdict == framing.TOO_LARGE:
            self.refuse(r.conn, self.limits.body_too_large())
        elif verdict == framing.HEAD_TOO_LARGE:
            self.refuse(r.conn, self.limits.headers_too_large())
        else:
            self.refuse(r.conn, HTTPError(
                "the chunked request body is malformed (RFC 9112 §7.1); send a "
                "Content-Length body or well-formed chunks", status=400,
                code="bad_request", field="body"))

    def fresh_count(self, now: float) -> int:
        """How many connections accepted less than FRESH_S ago have sent nothing yet."""
        while self._fresh:
            r = self._fresh[0]
            if r.fresh and now - r.since < FRESH_S:
                break
            self._unfresh(r)
            self._fresh.popleft()
        return self.fresh

    def _unfresh(self, r: _Reading) -> None:
        if r.fresh:
            r.fresh = False
            self.fresh -= 1

    def _forget(self, r: _Reading) -> None:
        self._unfresh(r)
        if r.registered:
            r.registered = False
            del self.reading[r.conn]
            self.worker.poller.unregister(r.conn.sock)

    # ------------------------------------------------------------------------- writing
    def refuse(self, conn: Any, error: HTTPError) -> None:
        """Answer ``error`` as JSON without a thread, then close."""
        out = WriteBehind(conn.sock, self.limits.send_timeout_s)
        try:
            out.sendall(error_response(error))
        except OSError:  # the peer is gone
            out.release()
            self.close_now(conn)
            return
        self.finished(conn, False, out)

    def finished(self, conn: Any, keep: bool, out: WriteBehind | None) -> None:
        """A response is written (or being written): send the rest, then go on or close."""
        if conn.sock.fileno() < 0:  # closed by the thread (gunicorn's error path)
            if out is not None:
                out.release()
            self.close_now(conn)
            return
        if out is not None and out.stalled:
            out.release()
            self.close_now(conn)
            return
        if out is not None and out.queue:
            conn.sock.setblocking(False)  # sendfile(2) has no MSG_DONTWAIT
            self.writing[conn] = (time.monotonic() + self.limits.send_timeout_s, out, keep)
            self.worker.poller.register(conn.sock, EVENT_WRITE, partial(self._writable, conn))
        elif keep:
            self._next_request(conn)
        else:
            self.close(conn)

    def _writable(self, conn: Any, _sock: Any) -> None:
        _, out, keep = self.writing[conn]
        try:
            sent = out.flush()
        except OSError:  # the peer is gone
            sent = -1
        if sent < 0 or not out.queue:
            del self.writing[conn]
            self.worker.poller.unregister(conn.sock)
            if sent < 0:
                out.release()
                self.close_now(conn)
            elif keep:
                self._next_request(conn)
            else:
                self.close(conn)
        elif sent:  # progress: the stall deadline starts again
            self.writing[conn] = (time.monotonic() + self.limits.send_timeout_s, out, keep)
            self.writing.move_to_end(conn)

    def _next_request(self, conn: Any) -> None:
        pipelined = conn.parser.unreader.take_buffered()
        if pipelined:  # read ahead with the last request: it may be incomplete
            self.begin(conn, pipelined)
            return
        # Idle: gunicorn's keep-alive wait (worker.on_client_socket_readable calls begin).
        w = self.worker
        conn.set_timeout()
        if not w.alive:
            conn.timeout = min(conn.timeout, time.monotonic() + STOP_LINGER_S)
        w.keepalived_conns.append(conn)
        w.poller.register(conn.sock, EVENT_READ, partial(w.on_client_socket_readable, conn))

    # ------------------------------------------------------------------------- closing
    def close(self, conn: Any) -> None:
        """Close after a response: FIN, then drain the peer's bytes for LINGER_S at most."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self.close_now(conn)
            return
        self.closing[conn] = (time.monotonic() + LINGER_S, 0)
        self.worker.poller.register(conn.sock, EVENT_READ, partial(self._linger, conn))

    def _linger(self, conn: Any, _sock: Any) -> None:
        deadline, drained = self.closing[conn]
        try:
            while data := conn.sock.recv(RECV_SIZE, _DONTWAIT):
                drained += len(data)
                if drained >= LINGER_MAX:
                    break
            else:  # the peer closed its side
                drained = LINGER_MAX
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            drained = LINGER_MAX
        if drained >= LINGER_MAX:
            del self.closing[conn]
            self.worker.poller.unregister(conn.sock)
            self.close_now(conn)
        else:
            self.closing[conn] = (deadline, drained)

    def close_now(self, conn: Any) -> None:
        """Close ``conn`` at once (it is in no state map, nor on the selector)."""
        self.worker.nr_conns -= 1
        util.close(conn.sock)

    # ------------------------------------------------------------------------- deadlines
    def next_deadline(self) -> float | None:
        """The earliest deadline of any connection here, or None."""
        firsts = [next(iter(self.reading.values())).deadline] if self.reading else []
        if self.writing:
            firsts.append(next(iter(self.writing.values()))[0])
        if self.closing:
            firsts.append(next(iter(self.closing.values()))[0])
        return min(firsts) if firsts else None

    def expire(self, now: float) -> None:
        """Close what is past its deadline: 408 for a request begun, silence for none."""
        while self.reading:
            r = next(iter(self.reading.values()))
            if r.deadline > now:
                break
            self._forget(r)
            if r.buf:
                self.refuse(r.conn, self.limits.request_timed_out())
            else:
                self.close_now(r.conn)
        while self.writing:
            conn, (deadline, out, _) = next(iter(self.writing.items()))
            if deadline > now:
                break
            del self.writing[conn]
            self.worker.poller.unregister(conn.sock)
            out.release()
            self.close_now(conn)
        while self.closing:
            conn, (deadline, _) = next(iter(self.closing.items()))
            if deadline > now:
                break
            del self.closing[conn]
            self.worker.poller.unregister(conn.sock)
            self.close_now(conn)

    def cap(self, deadline: float) -> None:
        """A stopping worker: requests not in by ``deadline`` are not waited for."""
        for r in self.reading.values():  # the same cap for all keeps the order
            r.deadline = min(r.deadline, deadline)


def error_response(error: HTTPError) -> bytes:
    """A whole HTTP/1.1 response carrying ``error`` as the API's JSON, closing the connection."""
    body = json.dumps(error.to_json(), separators=(",", ":")).encode() + b"\n"
    reason = http.HTTPStatus(error.status).phrase
    return (f"HTTP/1.1 {error.status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
            "Connection: close\r\n\r\n").encode() + body


def _send_now(sock: socket.socket, data: bytes) -> None:
    # A short interim answer: if it does not fit, the client sends the body anyway.
    with contextlib.suppress(OSError):
        sock.send(data, _DONTWAIT)
