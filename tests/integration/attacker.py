"""A malicious network between the edge and the cloud, for the attack tests.

``Attacker(upstream).start()`` is a :class:`~tests.integration.proxy.FaultProxy` (every
:class:`~tests.integration.proxy.Fault` still works) that can also *lie*. Each mode installs
an :class:`Attack` on the requests whose path contains its ``path``; the first match wins,
``times`` limits how many requests it hits (None: all of them), and requests no attack matches
go through the fault proxy as before. Every request, attacked or not, is in ``log`` with the
headers the device sent (:meth:`Attacker.sent_headers`). Modes::

    downgrade(version=1)        the manifest request's query becomes ?version=1 (alias=...:
                                ?alias=...), other parameters kept: the device gets the cloud's
                                genuine, signed manifest of an older version
    record() / replay(i)        keep every 200 manifest answer (body and headers; the cloud is
                                asked without If-None-Match so there is a body to keep), then
                                stop recording and answer manifest requests with recorded[i]
    freeze()                    304 Not Modified to every manifest request, echoing the ETag
                                the device sent; the cloud is never asked
    manifest_bomb(n)            the manifest is a gzip bomb of n compressed bytes
                                (Content-Encoding: gzip; ~1 MB decodes to ~1 GB of JSON)
    error_bomb(n, status=500)   the same as an error body, on any path (predict included)
    bomb(path, n, ...)          the general form: any path, status and body shape;
                                ``slow_start=(k, s)`` drips the first k bytes over s seconds
                                (each gap shorter than a socket time-out), then the rest
    predict_answer(body)        the predict answer replaced by ``body`` (JSON-able or bytes)
    drop_signature()            the manifest without its "signature"
    resign(registry_root)       the manifest signed by another key (made there if need be)
    inject_headers(headers)     add or replace response headers (and optionally the status):
                                a Location to another host with a 302, a huge header, a lying
                                Content-Encoding, an ETag with control characters
    redirect(location, 302)     answer with a redirect, without asking the cloud

Each mode returns its :class:`Attack` (``hits`` counts the requests it answered);
``remove(attack)`` switches one off, ``reset()`` all of them (and the faults and the log).

Bombs are built by repeating one deflate block (:func:`gzip_bomb`), so a gigabyte of decoded
body never exists in the test process. :class:`OtherHost` is a second loopback server, on
another address, that records whatever reaches it: the place a redirect points to, so a test
can assert that nothing (and no bearer token) ever arrives there.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests.integration.proxy import HOP_BY_HOP, Exchange, FaultProxy

MANIFEST = "/manifest"
PREDICT = "/predict"
MIB = 1 << 20

Headers = list[tuple[str, str]]

# Bodies a bomb decodes to: prefix + fill * N + suffix. JSON shapes parse if read whole, so a
# client that buffers and parses them pays for the decoded size twice or more.
BOMB_SHAPES: dict[str, tuple[bytes, bytes, bytes]] = {
    "manifest": (b'{"format": 1, "name": "iris", "padding": "', b"a", b'"}'),
    "error": (b'{"error": {"code": "cloud_unavailable", "message": "', b"a", b'"}}'),
    "predict": (b'{"name": "late", "model_version": 1, "predictions": ["', b"a", b'"]}'),
    "zeros": (b"", b"\0", b""),
}


@dataclass(frozen=True)
class Request:
    """What the device sent."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""


@dataclass(frozen=True)
class Reply:
    """What goes back to the device. ``slow_start`` = (k, seconds): send the first k body bytes
    one at a time spread over ``seconds``, then the rest at once, so a reader is still busy
    with this body when its caller's deadline passes. Content-Length is added unless
    ``headers`` carry one."""

    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    slow_start: tuple[int, float] | None = None

    def header(self, name: str) -> str | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def with_headers(self, headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> Reply:
        """A copy whose headers named in ``headers`` are replaced by (or extended with) them."""
        new = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        names = {k.lower() for k, _ in new}
        return replace(self, headers=[(k, v) for k, v in self.headers
                                      if k.lower() not in names] + new)


@dataclass(frozen=True)
class Recorded:
    """A manifest answer kept by :meth:`Attacker.record`."""

    path: str
    reply: Reply


@dataclass
class Attack:
    """One named attack on requests whose path contains ``path``."""

    name: str
    path: str
    act: Callable[[Request], Reply | None]  # None: the upstream is down, drop the connection
    times: int | None = None
    hits: int = 0

    def matches(self, path: str) -> bool:
        """True if this attack applies to ``path`` now."""
        return self.path in path and (self.times is None or self.hits < self.times)


@functools.lru_cache(maxsize=8)
def gzip_bomb(compressed_bytes: int, shape: str = "manifest") -> bytes:
    """A valid gzip stream of about ``compressed_bytes`` that decodes to ~1030 times that.

    One deflate block of 1 MiB of ``fill`` is compressed after a full flush, so every copy of
    it is the same bytes and decodes on its own; the stream is the prefix, that block repeated,
    the suffix, and the gzip trailer (CRC-32 and length of the whole decoded body).
    """
    prefix, fill, suffix = BOMB_SHAPES[shape]
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = comp.compress(prefix) + comp.flush(zlib.Z_FULL_FLUSH)
    chunk = fill * MIB
    block = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    again = comp.compress(chunk) + comp.flush(zlib.Z_FULL_FLUSH)
    assert block == again, "deflate blocks after a full flush should repeat exactly"
    tail = comp.compress(suffix) + comp.flush()
    copies = max(1, (compressed_bytes - len(head) - len(tail) - 18) // len(block))
    crc = zlib.crc32(prefix)
    for _ in range(copies):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(suffix, crc)
    size = len(prefix) + copies * MIB + len(suffix)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # gzip, deflate, no name, mtime 0
    return b"".join([header, head, block * copies, tail,
                     struct.pack("<II", crc, size & 0xFFFFFFFF)])


def bomb_decoded_size(compressed_bytes: int, shape: str = "manifest") -> int:
    """How many bytes :func:`gzip_bomb` ``(compressed_bytes, shape)`` decodes to."""
    body = gzip_bomb(compressed_bytes, shape)
    return struct.unpack("<I", body[-4:])[0]  # < 4 GiB for the sizes tests use


def with_query(path: str, drop: Iterable[str], **params: str) -> str:
    """``path`` with the query parameters in ``drop`` removed and ``params`` set."""
    parts = urlsplit(path)
    gone = set(drop) | set(params)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in gone]
    return urlunsplit(("", "", parts.path, urlencode(query + list(params.items())), ""))


def json_reply(status: int, doc: Any, headers: Headers | None = None) -> Reply:
    """A JSON answer."""
    return Reply(status, [("Content-Type", "application/json"), *(headers or [])],
                 json.dumps(doc).encode())


class Attacker(FaultProxy):
    """A fault proxy that also lies on purpose; see the module docstring for the modes."""

    def __init__(self, upstream: str) -> None:
        super().__init__(upstream)
        self.attacks: list[Attack] = []
        self.recorded: list[Recorded] = []

    def start(self) -> Attacker:
        """Listen on a free loopback port in a daemon thread."""
        super().start()
        return self

    def __enter__(self) -> Attacker:
        return self.start()

    # ------------------------------------------------------------------------ bookkeeping
    def add_attack(self, attack: Attack) -> Attack:
        """Install ``attack`` (first match wins) and return it."""
        with self._lock:
            self.attacks.append(attack)
        return attack

    def remove(self, attack: Attack) -> None:
        """Switch ``attack`` off."""
        with self._lock:
            self.attacks.remove(attack)

    def reset(self) -> None:
        """Forward faithfully again: no attacks, no faults, an empty log and no recordings."""
        with self._lock:
            self.attacks.clear()
            self.faults.clear()
            self.log.clear()
            self.recorded.clear()

    def sent_headers(self, path: str = "") -> list[dict[str, str]]:
        """The request headers the device sent on requests whose path contains ``path``."""
        return [e.headers for e in self.requests_to(path)]

    def _take_attack(self, path: str) -> Attack | None:
        with self._lock:
            for a in self.attacks:
                if a.matches(path):
                    a.hits += 1
                    return a
        return None

    # ------------------------------------------------------------------------------ modes
    def downgrade(self, version: int | None = 1, *, alias: str | None = None,
                  path: str = MANIFEST, times: int | None = None) -> Attack:
        """Rewrite the manifest request to ask for ``?version=`` (or ``?alias=``) instead."""
        if (version is None) == (alias is None):
            raise ValueError("downgrade(version=N) or downgrade(version=None, alias=NAME): "
                             "give exactly one")
        params = {"version": str(version)} if version is not None else {"alias": str(alias)}

        def act(req: Request) -> Reply | None:
            return self.forward(replace(req, path=with_query(req.path, ("version", "alias"),
                                                             **params)))
        return self.add_attack(Attack(f"downgrade {params}", path, act, times))

    def record(self, path: str = MANIFEST) -> Attack:
        """Pass manifest answers through, keeping each 200 in :attr:`recorded`."""
        def act(req: Request) -> Reply | None:
            reply = self.forward(req, fresh=True, identity=True)
            if reply is not None and reply.status == 200:
                with self._lock:
                    self.recorded.append(Recorded(req.path, reply))
            return reply
        return self.add_attack(Attack("record", path, act))

    def replay(self, index: int = 0, path: str = MANIFEST,
               times: int | None = None) -> Attack:
        """Answer manifest requests with the ``index``-th recorded answer; stops recording."""
        with self._lock:
            if not self.recorded:
                raise ValueError("nothing recorded: call record() and let the device sync first")
            kept = self.recorded[index].reply
            self.attacks = [a for a in self.attacks if not (a.name == "record" and a.path == path)]
        return self.add_attack(Attack(f"replay {index}", path, lambda req: kept, times))

    def freeze(self, path: str = MANIFEST) -> Attack:
        """Answer every manifest request 304 Not Modified with the device's own ETag."""
        def act(req: Request) -> Reply:
            etag = _get(req.headers, "If-None-Match")
            return Reply(304, [("ETag", etag)] if etag is not None else [])
        return self.add_attack(Attack("freeze", path, act))

    def bomb(self, path: str, compressed_bytes: int, *, status: int = 200,
             shape: str = "manifest", slow_start: tuple[int, float] | None = None,
             times: int | None = None) -> Attack:
        """Answer ``status`` with a gzip bomb of ``compressed_bytes`` (see :func:`gzip_bomb`)."""
        body = gzip_bomb(compressed_bytes, shape)
        reply = Reply(status, [("Content-Type", "application/json"),
                               ("Content-Encoding", "gzip")], body, slow_start)
        return self.add_attack(Attack(f"bomb {len(body)} bytes as {status}", path,
                                      lambda req: reply, times))

    def manifest_bomb(self, compressed_bytes: int, *, shape: str = "manifest",
                      times: int | None = None) -> Attack:
        """The manifest answer is a gzip bomb."""
        return self.bomb(MANIFEST, compressed_bytes, shape=shape, times=times)

    def error_bomb(self, compressed_bytes: int = MIB, status: int = 500, *, path: str = "",
                   slow_start: tuple[int, float] | None = None,
                   times: int | None = None) -> Attack:
        """An HTTP error whose JSON error body is a gzip bomb, on any path by default."""
        return self.bomb(path, compressed_bytes, status=status, shape="error",
                         slow_start=slow_start, times=times)

    def predict_answer(self, body: Any, *, status: int = 200, path: str = PREDICT,
                       times: int | None = None) -> Attack:
        """Replace the predict answer by ``body`` (bytes as they are, else JSON)."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        reply = Reply(status, [("Content-Type", "application/json")], data)
        return self.add_attack(Attack("predict answer", path, lambda req: reply, times))

    def drop_signature(self, path: str = MANIFEST) -> Attack:
        """Serve the genuine manifest without its ``signature``."""
        def strip(doc: dict[str, Any]) -> dict[str, Any]:
            doc.pop("signature", None)
            return doc
        return self.add_attack(Attack("drop signature", path, self._edit(strip)))

    def resign(self, registry_root: str | Path, path: str = MANIFEST) -> Attack:
        """Serve the genuine manifest signed by the key of another registry (made if absent)."""
        from hybridml.cloud.signing import KeyRing, Signer

        ring = KeyRing(registry_root)
        if ring.active_id() is None:
            ring.init()
        signer = Signer(registry_root)
        return self.add_attack(Attack("foreign signature", path, self._edit(signer.sign)))

    def inject_headers(self, headers: Mapping[str, str] | Iterable[tuple[str, str]], *,
                       status: int | None = None, path: str = "", fresh: bool = False,
                       times: int | None = None) -> Attack:
        """Forward, then add or replace response ``headers`` (and the status if given).

        The cloud is asked for an identity body, so a ``Content-Encoding`` set here is a lie;
        ``fresh`` also drops the device's If-None-Match, so it gets a 200 carrying the headers.
        """
        extra = list(headers.items()) if isinstance(headers, Mapping) else list(headers)

        def act(req: Request) -> Reply | None:
            reply = self.forward(req, fresh=fresh, identity=True)
            if reply is None:
                return None
            reply = reply.with_headers(extra)
            return reply if status is None else replace(reply, status=status)
        return self.add_attack(Attack(f"inject {[k for k, _ in extra]}", path, act, times))

    def redirect(self, location: str, status: int = 302, *, path: str = "",
                 times: int | None = None) -> Attack:
        """Answer with a redirect to ``location``; the cloud is not asked."""
        reply = Reply(status, [("Location", location), ("Content-Type", "text/plain")],
                      b"moved\n")
        return self.add_attack(Attack(f"redirect {status}", path, lambda req: reply, times))

    def _edit(self, change: Callable[[dict[str, Any]], dict[str, Any]]
              ) -> Callable[[Request], Reply | None]:
        """An act that forwards (for a full, plain body) and rewrites a 200 JSON answer."""
        def act(req: Request) -> Reply | None:
            reply = self.forward(req, fresh=True, identity=True)
            if reply is None or reply.status != 200:
                return reply
            return replace(reply, body=json.dumps(change(json.loads(reply.body))).encode())
        return act

    # ------------------------------------------------------------------------- forwarding
    def forward(self, req: Request, *, fresh: bool = False, identity: bool = False
                ) -> Reply | None:
        """The cloud's answer to ``req`` (None if it cannot be reached).

        ``fresh`` drops If-None-Match (a 200 with a body, never a 304); ``identity`` asks for
        an uncompressed body.
        """
        skip = set(HOP_BY_HOP)
        if fresh:
            skip.add("if-none-match")
        if identity:
            skip.add("accept-encoding")
        headers = {k: v for k, v in req.headers.items() if k.lower() not in skip}
        if identity:
            headers["Accept-Encoding"] = "identity"
        try:
            conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)
            try:
                conn.request(req.method, req.path, body=req.body or None, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            finally:
                conn.close()
        except OSError:
            return None
        return Reply(resp.status, [(k, v) for k, v in resp.getheaders()
                                   if k.lower() not in HOP_BY_HOP], body)

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        attack = self._take_attack(h.path)
        if attack is None:
            super()._handle(h)  # the fault proxy: faults, or a faithful forward
            return
        length = int(h.headers.get("Content-Length") or 0)
        req = Request(h.command, h.path, dict(h.headers.items()),
                      h.rfile.read(length) if length else b"")
        ex = Exchange(req.method, req.path, req.headers, 0, fault=True)
        self._record(ex)
        reply = attack.act(req)
        if reply is None:  # the cloud is down: look like it to the device
            h.close_connection = True
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_RDWR)
            return
        self._send(h, ex, reply)

    def _send(self, h: BaseHTTPRequestHandler, ex: Exchange, reply: Reply) -> None:
        ex.status, ex.response_headers = reply.status, dict(reply.headers)
        try:
            h.send_response_only(reply.status)
            for k, v in reply.headers:
                h.send_header(k, v)
            if reply.header("Content-Length") is None:
                h.send_header("Content-Length", str(len(reply.body)))
            h.end_headers()
            if h.command == "HEAD":
                h.wfile.flush()
                return
            rest = reply.body
            if reply.slow_start is not None:
                count, seconds = reply.slow_start
                head, rest = rest[:count], rest[count:]
                for i in range(len(head)):
                    h.wfile.write(head[i:i + 1])
                    h.wfile.flush()
                    time.sleep(seconds / len(head))
            h.wfile.write(rest)
            h.wfile.flush()
            ex.body_sent = reply.body
        except OSError:  # the device hung up (a bounded reader stops early): fine
            h.close_connection = True


def _get(headers: Mapping[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


@dataclass(frozen=True)
class Seen:
    """A request that reached :class:`OtherHost`."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class OtherHost:
    """A loopback server on another address (127.0.0.2 by default) that records requests.

    It answers every request ``status`` with ``body`` (a JSON 404 by default): the place a
    redirect sends the device, so a test can assert nothing, and no token, ever arrives.
    """

    def __init__(self, host: str = "127.0.0.2", status: int = 404,
                 body: bytes = b'{"error": {"code": "not_found", "message": "other host"}}'
                 ) -> None:
        self.host, self.status, self.body = host, status, body
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        """Base URL."""
        assert self._server is not None, "start() the server first"
        return f"http://{self.host}:{self._server.server_address[1]}"

    def start(self) -> OtherHost:
        """Listen on a free port of ``host`` in a daemon thread."""
        other = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with other._lock:
                    other.seen.append(Seen(self.command, self.path, dict(self.headers.items()),
                                           body))
                self.send_response(other.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(other.body)))
                self.end_headers()
                self.wfile.write(other.body)

            do_POST = do_HEAD = do_PUT = do_DELETE = do_GET

        self._server = ThreadingHTTPServer((self.host, 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def clear(self) -> None:
        """Forget what was seen."""
        with self._lock:
            self.seen.clear()

    def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> OtherHost:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
