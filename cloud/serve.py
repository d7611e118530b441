"""Run the API: gunicorn (the default: 2 workers of 2 threads) or Flask's development server.

``hybridml-cloud serve`` calls :func:`serve`; gunicorn can also load the app directly with
``gunicorn 'hybridml.cloud.serve:wsgi()'`` (the registry comes from ``$HYBRIDML_REGISTRY``).

Secure by default: ``serve`` refuses to start until the registry has an API token and a
signing key (``hybridml-cloud tokens create``, ``keys init``). ``--insecure`` skips token checks
and is only allowed on a loopback address, for tests and local experiments. ``wsgi()`` always
checks tokens unless ``HYBRIDML_INSECURE=1`` is set, which is then the operator's call.

Overload: gunicorn runs :class:`SheddingWorker` (gthread), whose queue is bounded: a request
that finds the worker full (``HYBRIDML_MAX_PENDING``) or waited too long for a thread
(``HYBRIDML_MAX_QUEUE_MS``) gets 503 + ``Retry-After`` at once, instead of the queue, and
every client's latency, growing without bound. With an external gunicorn, pass
``--worker-class hybridml.cloud.serve.SheddingWorker`` to get the same.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
import threading
import time
from typing import Any

from flask import Flask
from gunicorn.workers.gthread import ThreadWorker

from hybridml.shared.errors import ConfigError

from .app import ServeConfig, create_app
from .auth import INSECURE_ENV
from .shedding import HEALTH_PATH, ShedLog, overloaded
from .signing import KeyRing
from .tokens import TokenStore

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


class SheddingWorker(ThreadWorker):  # type: ignore[misc]
    """gunicorn's gthread worker with a bounded queue: past it, a 503 at once.

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
    with 16 clients, one worker served 14-16 of them while the other idled.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pending = 0
        self.limits = ServeConfig.from_env()  # serve() read the same variables
        self.shed = ShedLog()
        self._defer_until: float | None = None  # set while busy and leaving accepts to others

    def enqueue_req(self, conn: Any) -> None:
        """Hand a connection to the thread pool, stamped with the time and the queue depth."""
        self.pending += 1
        conn.hybridml_queued = (time.monotonic(), self.pending)
        super().enqueue_req(conn)

    def finish_request(self, *args: Any) -> None:
        """A request is done (main thread); gunicorn 22 passes (fs), 27 (conn, fs)."""
        self.pending -= 1
        if self.pending < self.cfg.threads:
            self._defer_until = None  # idle again: accept at once
        super().finish_request(*args)

    # ------------------------------------------------------ accepting (main thread only)
    def accept(self, *args: Any) -> None:
        """Take a new connection, unless busy and another worker may take it sooner."""
        if _CAN_DEFER and self.pending >= self.cfg.threads:
            now = time.monotonic()
            if self._defer_until is None:
                self._defer_until = now + min(
                    ACCEPT_DEFER_MAX_S,
                    ACCEPT_DEFER_STEP_S * (self.pending - self.cfg.threads + 1))
            if now < self._defer_until and _waiting(args[-1]) <= self.limits.max_pending:
                self.set_accept_enabled(False)  # no busy loop on a readable listener
                return
            self._defer_until = None  # this one is taken; the next waits its turn again
        super().accept(*args)

    def set_accept_enabled(self, enabled: bool) -> None:
        """gunicorn's switch, held off while this worker leaves new connections to others."""
        if enabled and self._defer_until is not None and self.pending >= self.cfg.threads \
                and time.monotonic() < self._defer_until:
            enabled = False
        super().set_accept_enabled(enabled)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """Wait no longer than the deferral, so a connection still waiting is then taken."""
        if self._defer_until is not None and not self._accepting:
            timeout = max(0.0, min(timeout, self._defer_until - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)

    def handle(self, conn: Any) -> Any:
        """Serve a connection's next request in a pool thread, noting how long it queued."""
        queued_at, depth = getattr(conn, "hybridml_queued", (time.monotonic(), 1))
        _handling.queued = (time.monotonic() - queued_at, depth)
        return super().handle(conn)

    def handle_request(self, req: Any, conn: Any) -> bool:
        """Run the app, or answer 503 if the request found the worker full."""
        waited, depth = getattr(_handling, "queued", (0.0, 1))
        fits = depth <= self.limits.max_pending and waited * 1000 <= self.limits.max_queue_ms
        if fits or req.path == HEALTH_PATH:
            return bool(super().handle_request(req, conn))
        self.shed.shed(depth, waited)
        close = bool(req.should_close()) or not self.alive
        body, headers = overloaded(depth, waited, self.limits.retry_after_s)
        if close:
            headers.append(("Connection", "close"))
        head = "".join(f"{k}: {v}\r\n" for k, v in headers)
        conn.sock.sendall(f"HTTP/1.1 503 Service Unavailable\r\n{head}\r\n".encode()
                          + (b"" if req.method == "HEAD" else body))
        return not close  # kept alive: gunicorn drains the unread body before the next request


def _waiting(listener: Any) -> int:
    """Connections waiting to be accepted on a TCP listener (Linux); 0 when unknown."""
    try:
        info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
        # struct tcp_info: for a listening socket, tcpi_unacked is the accept queue length
        return int(struct.unpack_from("=I", info, 24)[0])
    except (AttributeError, OSError, struct.error):  # not Linux, or a Unix socket
        return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (for demos, tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wsgi() -> Flask:
    """App factory for an external WSGI server."""
    return create_app()


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


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
    if TokenStore(registry).count_active() == 0:
        raise ConfigError(
            f"no API tokens in {registry}: create one with 'hybridml-cloud tokens create --role "
            "device --name LABEL' (and an admin one to promote over HTTP), or pass --insecure "
            "to serve without tokens on loopback only", field="tokens")
    if KeyRing(registry).active_id() is None:
        raise ConfigError(
            f"no signing key in {registry}: run 'hybridml-cloud keys init' and give devices "
            "the .pub file it prints ('hybridml-edge trust add FILE'), or pass --insecure to "
            "serve unsigned manifests on loopback only", field="keys")


def serve(registry: str, host: str = "127.0.0.1", port: int = 8000, workers: int = 2,
          dev: bool = False, timeout: int = 30, insecure: bool = False) -> int:
    """Serve ``registry`` on ``host:port`` until interrupted; returns an exit code.

    Without ``insecure`` the registry needs an active token and a signing key; with it, only
    a loopback ``host`` is allowed (see :func:`check_security`).
    """
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port", field="port")
    if workers < 1:
        raise ConfigError("--workers must be at least 1", field="workers")
    check_security(registry, host, insecure)
    os.environ["HYBRIDML_REGISTRY"] = registry
    os.environ[INSECURE_ENV] = "1" if insecure else "0"
    config = ServeConfig.from_env()
    app = create_app(registry, config)
    if dev:
        log.warning("serving %s on http://%s:%d with Flask's development server", registry,
                    host, port)
        app.run(host=host, port=port, threaded=True, use_reloader=False)
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
    }
    log.warning("serving %s on http://%s:%d with gunicorn (%d workers x %d threads; 503 past "
                "%d pending or %d ms queued per worker)", registry, host, port, workers,
                config.threads, config.max_pending, config.max_queue_ms)
    _Gunicorn(app, options).run()
    return 0
