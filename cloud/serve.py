"""Run the API: gunicorn (the default: 2 workers of 2 threads) or Flask's development server.

``hybridml-cloud serve`` calls :func:`serve`; gunicorn can also load the app directly with
``gunicorn 'hybridml.cloud.serve:wsgi()'`` (the registry comes from ``$HYBRIDML_REGISTRY``).
``--port 0 --ready-file PATH`` binds any free port and writes the URL to PATH once listening.

Secure by default: ``serve`` refuses to start until the registry has an API token and a
signing key (``hybridml-cloud tokens create``, ``keys init``). ``--insecure`` skips token checks
and is only allowed on a loopback address, for tests and local experiments (the app then also
refuses cross-site and DNS-rebinding requests, see :mod:`hybridml.cloud.auth`). ``wsgi()``
always checks tokens unless ``HYBRIDML_INSECURE=1`` is set, which is then the operator's call.

TLS: ``--certfile FILE --keyfile FILE`` (or ``$HYBRIDML_CERTFILE`` / ``$HYBRIDML_KEYFILE``)
serve HTTPS with gunicorn's TLS; both files are checked before gunicorn starts
(:mod:`hybridml.cloud.tls`), and the ready file then holds an ``https://`` URL. Under TLS
the worker has no buffering front (below): for many slow clients, terminate TLS in a proxy
in front of a plain-HTTP server on loopback instead.

The worker, :class:`SheddingWorker` (gunicorn's gthread with two additions):

* Slow clients wait on the main thread, never in one of the few request threads. Its
  front (:mod:`hybridml.cloud.front`) reads each request whole with non-blocking reads
  before a thread sees it, and finishes sending the responses that a client reads slowly.
  A request must arrive within ``HYBRIDML_REQUEST_TIMEOUT_S`` (else 408 and close), with
  headers under ``HYBRIDML_MAX_HEADER_BYTES`` (else 431) and a body under
  ``HYBRIDML_MAX_BODY_BYTES`` (else 413, before the body is read); a response the client
  stops reading for ``HYBRIDML_SEND_TIMEOUT_S`` is abandoned. Idle kept-alive connections
  wait on the same selector (gunicorn's keep-alive, 5 s). Plain sockets only: under TLS or
  HTTP/2 the worker falls back to gunicorn's thread-per-read model.
* Overload: the queue for the threads is bounded: a request that finds the worker full
  (``HYBRIDML_MAX_PENDING``) or waited too long for a thread (``HYBRIDML_MAX_QUEUE_MS``)
  gets 503 + ``Retry-After`` at once, instead of the queue, and every client's latency,
  growing without bound.

With an external gunicorn, pass ``--worker-class hybridml.cloud.serve.SheddingWorker`` to get
the same.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flask import Flask
from gunicorn.http.unreader import Unreader
from gunicorn.workers.gthread import TConn, ThreadWorker

from hybridml.shared.errors import ConfigError
from hybridml.shared.files import atomic_write
from hybridml.shared.net import is_loopback

from .app import create_app
from .auth import INSECURE_ENV
from .config import ServeConfig
from .front import Front
from .prom import prepare_multiprocess
from .registry import Registry
from .shedding import HEALTH_PATH, ShedLog, overloaded
from .signing import KeyRing
from .tls import tls_files
from .tokens import TokenStore
from .writebehind import ClientStalled, WriteBehind

log = logging.getLogger("hybridml.cloud.serve")
_handling = threading.local()  # (seconds queued, queue depth) of the request a thread runs
# A worker whose threads are all busy leaves a new connection to the other workers for
# ACCEPT_DEFER_STEP_S per request it holds (at most ACCEPT_DEFER_MAX_S), then takes one: the
# least loaded worker wakes first. Past max_pending connections waiting to be accepted, all
# take them at once, to shed what does not fit with 503s instead of leaving it in the kernel.
ACCEPT_DEFER_STEP_S = 0.001
ACCEPT_DEFER_MAX_S = 0.02
# gunicorn >= 23's gthread lets a worker stop and resume accepting; 22's does not (no deferral).
_CAN_DEFER = all(hasattr(ThreadWorker, m) for m in ("set_accept_enabled",
                                                    "wait_for_and_dispatch_events"))
# The front needs gunicorn 27's gthread: one selector loop, keep-alive callbacks, and an
# unreader that gives back the bytes it holds.
_CAN_FRONT = _CAN_DEFER and hasattr(ThreadWorker, "on_client_socket_readable") \
    and hasattr(Unreader, "take_buffered")


_HANDED_BACK = object()  # handle(): the request is not whole; the front reads the rest


class _Responding:
    """What gunicorn's ``handle_request`` uses of a connection, writing through ``sock``."""

    __slots__ = ("client", "server", "sock")

    def __init__(self, sock: WriteBehind, conn: Any) -> None:
        self.sock, self.client, self.server = sock, conn.client, conn.server


class SheddingWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker with a buffering front and a bounded queue.

    Front: see :mod:`hybridml.cloud.front`. ``front`` is None (gunicorn's own model: a
    thread reads each request) under TLS, HTTP/2 or a gunicorn older than 27.

    ``pending`` counts the requests this worker holds (queued for a thread or running); it
    changes only on the worker's main thread: +1 when a connection with a request goes to
    the thread pool, -1 when that request is done. A request that found ``max_pending``
    already there, or that waited more than ``max_queue_ms`` for a thread, gets 503 +
    ``Retry-After`` before it reaches the app: it is parsed and its body drained (the
    connection stays usable) but there is no WSGI environ, no Flask, no JSON and no model,
    so shedding costs a fraction of a prediction and an overloaded worker keeps serving.

    New connections go to the least busy worker: all watch the shared listening socket, and
    one without an idle thread leaves a new connection to the others for a while that grows
    with its load (:data:`ACCEPT_DEFER_STEP_S`), then takes one. Otherwise the first worker to
    wake takes most of a burst of connections, and kept-alive clients stay where they landed:
    with 16 clients, one worker served 14-16 of them while the other idled. Load is
    ``pending`` plus the connections just accepted that have sent nothing yet (see
    :data:`hybridml.cloud.front.FRESH_S`): a pool of clients connecting at once is spread
    before its first requests arrive.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending = 0
        self.limits = ServeConfig.from_env()  # serve() read the same variables
        self.shed = ShedLog()
        self._defer_until: float | None = None  # set while busy and leaving accepts to others
        plain = not self.cfg.is_ssl and "h2" not in getattr(self.cfg, "http_protocols", ())
        self.front = Front(self, self.limits) if _CAN_FRONT and plain else None
        if self.front is None:
            log.warning("no buffering front (%s): a slow client holds a request thread",
                        "TLS or HTTP/2" if _CAN_FRONT else "gunicorn older than 27")

    def enqueue_req(self, conn: Any) -> None:
        """Hand a connection to the thread pool, stamped with the time and the queue depth."""
        self.pending += 1
        conn.hybridml_queued = (time.monotonic(), self.pending)
        super().enqueue_req(conn)

    def finish_request(self, *args: Any) -> None:
        """A request is done (main thread); gunicorn 22 passes (fs), 27 (conn, fs)."""
        self.pending -= 1
        if self._load() < self.cfg.threads:
            self._defer_until = None  # idle again: accept at once
        if self.front is None:
            super().finish_request(*args)
            return
        conn, fs = args
        try:
            result = None if fs.cancelled() else fs.result()
            if result is _HANDED_BACK:
                self.front.resume(conn)
            else:
                self.front.finished(conn, result is True, getattr(conn, "hybridml_out", None))
        except Exception:  # as in gunicorn's finish_request: lose the connection, not the worker
            log.exception("error finishing a request; closing its connection")
            self.nr_conns -= 1
            conn.close()

    # ------------------------------------------------- connections (main thread only)
    def _load(self) -> int:
        """Requests held, plus connections just accepted that may bring one at once.

        The latter count for at most the threads: a burst of silent connections must not
        make every worker defer every accept.
        """
        if self.front is None:
            return self.pending
        return self.pending + min(self.cfg.threads, self.front.fresh_count(time.monotonic()))

    def accept(self, *args: Any) -> None:
        """Take a new connection, unless busy and another worker may take it sooner."""
        load = self._load()
        if _CAN_DEFER and load >= self.cfg.threads:
            now = time.monotonic()
            if self._defer_until is None:
                self._defer_until = now + min(
                    ACCEPT_DEFER_MAX_S, ACCEPT_DEFER_STEP_S * (load - self.cfg.threads + 1))
            if now < self._defer_until and _waiting(args[-1]) <= self.limits.max_pending:
                self.set_accept_enabled(False)  # no busy loop on a readable listener
                return
            self._defer_until = None  # this one is taken; the next waits its turn again
        if self.front is None:
            super().accept(*args)
            return
        listener = args[-1]
        try:
            sock, addr = listener.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        self.nr_conns += 1
        self.front.accepted(TConn(self.cfg, sock, addr, listener.getsockname()))

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        """A kept-alive connection has bytes: a thread tries its next request (see handle)."""
        if self.front is not None:
            conn.hybridml_take = True
        super().on_client_socket_readable(conn, client)

    def murder_pending(self) -> None:
        """Close what is past its deadline (runs after every wait of the main loop)."""
        super().murder_pending()
        if self.front is not None:
            self.front.expire(time.monotonic())

    def _cap_keepalive(self, deadline: float) -> None:
        """A stopping worker: kept-alive and half-read connections end by ``deadline``."""
        super()._cap_keepalive(deadline)
        if self.front is not None:
            self.front.cap(deadline)

    def set_accept_enabled(self, enabled: bool) -> None:
        """gunicorn's switch, held off while this worker leaves new connections to others."""
        if enabled and self._defer_until is not None and self._load() >= self.cfg.threads \
                and time.monotonic() < self._defer_until:
            enabled = False
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """Wait no longer than the deferral, or than the front's next deadline."""
        if self._defer_until is not None and not self._accepting:
            timeout = min(timeout, self._defer_until - time.monotonic())
        if self.front is not None:
            deadline = self.front.next_deadline()
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
        super().wait_for_and_dispatch_events(max(0.0, timeout))

    # ------------------------------------------------------------------- pool threads
    def handle(self, conn: Any) -> Any:
        """Serve a connection's next request in a pool thread, noting how long it queued.

        A kept-alive connection's request is read here first, without waiting: if it is
        not whole, the connection goes back to the front (main thread) at once.
        """
        queued_at, depth = getattr(conn, "hybridml_queued", (time.monotonic(), 1))
        _handling.queued = (time.monotonic() - queued_at, depth)
        if getattr(conn, "hybridml_take", False):
            conn.hybridml_take = False
            assert self.front is not None
            taken = self.front.take(conn)
            if taken is None:
                return False  # the peer closed
            if not taken:
                return _HANDED_BACK
        return super().handle(conn)

    def handle_request(self, req: Any, conn: Any) -> bool:
        """Run the app, or answer 503 if the request found the worker full."""
        out, responding = conn.sock, conn
        if self.front is not None:  # the response goes out through the front
            if getattr(conn, "hybridml_out", None) is None:  # once per connection
                conn.hybridml_out = WriteBehind(conn.sock, self.limits.send_timeout_s)
                conn.hybridml_responding = _Responding(conn.hybridml_out, conn)
            out, responding = conn.hybridml_out, conn.hybridml_responding
        waited, depth = getattr(_handling, "queued", (0.0, 1))
        fits = depth <= self.limits.max_pending and waited * 1000 <= self.limits.max_queue_ms
        try:
            if fits or req.path == HEALTH_PATH:
                return bool(super().handle_request(req, responding))
            self.shed.shed(depth, waited)
            close = bool(req.should_close()) or not self.alive
            body, headers = overloaded(depth, waited, self.limits.retry_after_s)
            if close:
                headers.append(("Connection", "close"))
            head = "".join(f"{k}: {v}\r\n" for k, v in headers)
            out.sendall(f"HTTP/1.1 503 Service Unavailable\r\n{head}\r\n".encode()
                        + (b"" if req.method == "HEAD" else body))
            return not close  # kept alive: gunicorn drains the unread body first
        except ClientStalled as exc:
            log.info("dropped a response to %s: %s", conn.client, exc)
            return False


def _waiting(listener: Any) -> int:
    """Connections waiting to be accepted on a TCP listener (Linux); 0 when unknown."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
        # struct tcp_info: for a listening socket, tcpi_unacked is the accept queue length
        return int(struct.unpack_from("=I", info, 24)[0])
    except (AttributeError, OSError, struct.error):  # not Linux, or a Unix socket
        return 0


def url_of(host: str, port: int, scheme: str = "http") -> str:
    """``scheme://host:port``, with brackets around an IPv6 address."""
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def write_ready_file(path: str | os.PathLike[str], url: str) -> None:
    """Write ``url`` to ``path`` atomically: a reader sees the whole URL or no file."""
    atomic_write(Path(path), (url + "\n").encode())


def ready_hook(path: str | os.PathLike[str] | None) -> Callable[[Any], None]:
    """A gunicorn ``when_ready`` hook: log the URL each listener got, write it to ``path``.

    With port 0 the system picks the port; this is how the caller learns it.
    """
    def when_ready(server: Any) -> None:
        scheme = "https" if server.cfg.is_ssl else "http"
        for listener in server.LISTENERS:
            host, port = listener.getsockname()[:2]
            url = url_of(host, port, scheme)
            log.warning("listening on %s", url)
            if path is not None:
                write_ready_file(path, url)

    return when_ready


def wsgi() -> Flask:
    """App factory for an external WSGI server."""
    return create_app()


def check_security(registry: str, host: str, insecure: bool) -> None:
    """Refuse to serve without tokens and a signing key, unless ``insecure`` on loopback."""
    if insecure:
        if not is_loopback(host):
            raise ConfigError(
                f"--insecure serves without checking tokens, so it only binds to loopback "
                f"(127.0.0.1, ::1, localhost), not {host!r}; to serve on {host}, create a token "
                "('hybridml-cloud tokens create --role device --name LABEL') and drop --insecure",
                field="host")
        log.warning("insecure mode: no token checks on %s (loopback only)", host)
        return
    reg = Registry.from_env(registry)  # on the backends the flags or environment name
    if TokenStore(reg).count_active() == 0:
        raise ConfigError(
            f"no API tokens in {registry}: create one with 'hybridml-cloud tokens create --role "
            "device --name LABEL' (and an admin one to promote over HTTP), or pass --insecure "
            "to serve without tokens on loopback only", field="tokens")
    ring = KeyRing(reg)
    active = ring.active_id()
    if active is None:
        raise ConfigError(
            f"no signing key in {registry}: run 'hybridml-cloud keys init' and give devices "
            "the .pub file it prints ('hybridml-edge trust add FILE'), or pass --insecure to "
            "serve unsigned manifests on loopback only", field="keys")
    ring.private_key(active)  # a replica that cannot unseal the key says so before serving


def serve(registry: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 2,
          dev: bool = False, timeout: int = 30, insecure: bool = False,
          ready_file: str | os.PathLike[str] | None = None, certfile: str | None = None,
          keyfile: str | None = None) -> int:
    """Serve ``registry`` on ``host:port`` until interrupted; returns an exit code.

    Without ``insecure`` the registry needs an active token and a signing key; with it, only
    a loopback ``host`` is allowed (see :func:`check_security`). ``port`` 0 takes any free
    port; ``ready_file`` receives the URL once the server listens. ``certfile`` and
    ``keyfile`` (or their environment variables, :func:`~hybridml.cloud.tls.tls_files`)
    serve HTTPS.
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port", field="port")
    if workers < 1:
        raise ConfigError("--workers must be at least 1", field="workers")
    tls = tls_files(certfile, keyfile)
    check_security(registry, host, insecure)
    scheme = "http" if tls is None else "https"
    os.environ["HYBRIDML_REGISTRY"] = registry
    os.environ[INSECURE_ENV] = "1" if insecure else "0"
    config = ServeConfig.from_env()
    prepare_multiprocess()  # before the app and the workers: /metrics sums every worker
    app = create_app(registry, config)
    if dev:
        from werkzeug.serving import make_server

        server = make_server(host, port, app, threaded=True,
                             ssl_context=None if tls is None else (tls.certfile, tls.keyfile))
        url = url_of(host, server.server_port, scheme)
        log.warning("serving %s on %s with Flask's development server", registry, url)
        if ready_file is not None:
            write_ready_file(ready_file, url)
        try:
            server.serve_forever()
        finally:
            server.server_close()
        return 0
    from gunicorn.app.base import BaseApplication

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def __init__(self, application: Flask, options: dict[str, Any]) -> None:
            self.application = application
            self.options = options
            super().__init__()

        def load_config(self) -> None:
            for key, value in self.options.items():
                self.cfg.set(key, value)

        def load(self) -> Flask:
            return self.application

    options = {
        "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "workers": workers,
        "worker_class": SheddingWorker,
        "threads": config.threads,
        "timeout": timeout,
        "graceful_timeout": 10,
        "keepalive": 5,
        "backlog": 256,
        "loglevel": "warning",
        "accesslog": None,
        "proc_name": "hybridml-cloud",
        "when_ready": ready_hook(ready_file),
    }
    if tls is not None:
        options.update(certfile=tls.certfile, keyfile=tls.keyfile)
    log.warning("serving %s over %s with gunicorn (%d workers x %d threads; 503 past %d "
                "pending or %d ms queued per worker; requests in %d s, responses read within "
                "%d s)", registry, scheme.upper(), workers, config.threads, config.max_pending,
                config.max_queue_ms, config.request_timeout_s, config.send_timeout_s)
    _Gunicorn(app, options).run()
    return 0
