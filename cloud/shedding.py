"""Load shedding: a full worker answers 503 + ``Retry-After`` instead of queueing without bound.

Two guards share the answer (:func:`overloaded`) and the rate-limited log line (:class:`ShedLog`):

* :class:`hybridml.cloud.serve.SheddingWorker`, the gunicorn worker of ``hybridml-cloud serve``,
  sheds before the app runs, counting the requests queued for its threads too;
* :class:`LoadShedder`, WSGI middleware around the Flask app, guards any other WSGI server
  (Flask's, an external gunicorn) by counting the requests in flight in the process. Being the
  outermost layer, it also writes the one INFO line per request (method, path, status, ms);
  the method and path are escaped (:func:`hybridml.shared.text.printable`), so a path with
  ``%0d%0a`` or other control characters stays on its line and cannot forge another.

``/healthz`` is never shed: it says the process lives, not that it has room.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from hybridml.shared.errors import HTTPError
from hybridml.shared.text import printable

from .config import ServeConfig

log = logging.getLogger("hybridml.cloud.shedding")
request_log = logging.getLogger("hybridml.cloud.app")  # the request lines keep their logger
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
HEALTH_PATH = "/healthz"


def overloaded(pending: int, waited_s: float, retry_after_s: int
               ) -> tuple[bytes, list[tuple[str, str]]]:
    """Body and headers of a load-shedding 503 (the same from the worker and the middleware)."""
    body = json.dumps(HTTPError(
        f"the server is at capacity ({pending} requests pending in this worker, "
        f"{waited_s * 1000:.0f} ms queued); retry after {retry_after_s} s",
        status=503, code="overloaded", retry_after_s=retry_after_s).to_json()).encode()
    return body, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                  ("Retry-After", str(retry_after_s)), ("Cache-Control", "no-store")]


class ShedLog:
    """Counts shed requests; logs at most one line per 5 s, not one per request."""

    def __init__(self) -> None:
        self.count = 0
        self._lock = threading.Lock()
        self._logged_at = 0.0
        self._logged = 0

    def shed(self, pending: int, waited_s: float) -> None:
        """Count one shed request."""
        with self._lock:
            self.count += 1
            now = time.monotonic()
            if now - self._logged_at < 5.0:
                return
            n, self._logged_at, self._logged = self.count - self._logged, now, self.count
        log.warning("overloaded: shed %d requests (now %d pending, %.0f ms queued)", n,
                    pending, waited_s * 1000)


class LoadShedder:
    """WSGI middleware: past ``max_pending`` requests in flight in this process, answer 503.

    The guard for any WSGI server (Flask's, an external gunicorn with many threads). Under
    ``hybridml-cloud serve`` the gunicorn worker (:class:`hybridml.cloud.serve.SheddingWorker`)
    sheds earlier and cheaper, counting the requests *queued* for its threads too; its
    threads never exceed ``max_pending``, so this guard stays idle there.

    It also logs each admitted request at INFO on ``hybridml.cloud.app`` (shed ones are
    counted by :class:`ShedLog` instead); with INFO off that costs one level check.
    """

    def __init__(self, app: WSGIApp, config: ServeConfig) -> None:
        self.app = app
        self.max_pending = config.max_pending
        self.retry_after_s = config.retry_after_s
        self.log = ShedLog()
        self._inflight = 0
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        """Admit the request to the app, or answer 503 at once."""
        if environ.get("PATH_INFO") == HEALTH_PATH:
            return self._admitted(environ, start_response)
        with self._lock:
            self._inflight += 1
            pending = self._inflight
        try:
            if pending > self.max_pending:
                self.log.shed(pending, 0.0)
                body, headers = overloaded(pending, 0.0, self.retry_after_s)
                start_response("503 SERVICE UNAVAILABLE", headers)
                return [body]
            return self._admitted(environ, start_response)
        finally:
            with self._lock:
                self._inflight -= 1

    def _admitted(self, environ: dict[str, Any], start_response: Callable[..., Any]
                  ) -> Iterable[bytes]:
        if not request_log.isEnabledFor(logging.INFO):
            return self.app(environ, start_response)
        t0 = time.perf_counter()
        status: list[str] = []

        def noting(code: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            status.append(code)
            return start_response(code, headers, exc_info)

        body = self.app(environ, noting)
        # One line, formatted only when a handler takes it (%-style arguments).
        request_log.info("%s %s %s %.1fms", printable(str(environ.get("REQUEST_METHOD")), 20),
                         printable(environ.get("PATH_INFO", "")),
                         status[-1][:3] if status else "-", (time.perf_counter() - t0) * 1000)
        return body
