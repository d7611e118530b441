"""The API's serving settings (:class:`ServeConfig`) and the refusals that enforce its limits.

A refusal is built here once, so the Flask app and the gunicorn worker's front (which refuses
a request before any thread or Flask sees it, :mod:`hybridml.cloud.front`) answer the same
status, code and message for the same limit.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from hybridml.shared.errors import ConfigError, HTTPError
from hybridml.shared.release import DEFAULT_LIFETIME_S
from hybridml.shared.settings import load_env


@dataclass(frozen=True)
class ServeConfig:
    """API settings; :meth:`from_env` reads ``HYBRIDML_<FIELD>`` variables.

    Load shedding: a worker holding ``max_pending`` requests (queued or running) answers the
    next with 503, and so does a request that waited longer than ``max_queue_ms`` for a
    thread; ``retry_after_s`` goes in the ``Retry-After`` header. ``threads`` is the number
    of request threads per gunicorn worker.

    Slow clients: a request (headers and body) must arrive within ``request_timeout_s`` of
    its first byte, or of the connection for a new one, and its headers within
    ``max_header_bytes``; a response the client stops reading for ``send_timeout_s`` is
    abandoned. Until then such a client waits on the worker's main thread, not in a thread.

    Freshness: a served manifest's signed release block expires ``manifest_lifetime_s``
    after it was issued (default 24 h); devices refuse an expired one, so this bounds how
    long a recorded manifest can be replayed (:mod:`hybridml.shared.release`).
    """

    max_batch: int = 1000
    max_body_bytes: int = 4 * 1024 * 1024
    compress_min_bytes: int = 16 * 1024
    model_cache: int = 8
    max_pending: int = 32
    max_queue_ms: int = 1000
    retry_after_s: int = 1
    threads: int = 2
    request_timeout_s: int = 10
    send_timeout_s: int = 30
    max_header_bytes: int = 64 * 1024
    manifest_lifetime_s: int = DEFAULT_LIFETIME_S

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ConfigError(f"{f.name} must be a positive integer", field=f.name)

    @classmethod
    def from_env(cls, env: Any = None) -> ServeConfig:
        """Build from ``HYBRIDML_MAX_BATCH``, ``HYBRIDML_MAX_BODY_BYTES`` and so on, with the
        kit's one settings loader (:func:`hybridml.shared.settings.load_env`)."""
        return load_env(cls, env=env)

    def body_too_large(self) -> HTTPError:
        """The 413 for a body over ``max_body_bytes`` (from the app and from the worker)."""
        return HTTPError(f"request body is larger than {self.max_body_bytes} bytes; send "
                         "fewer rows per request", status=413, code="request_entity_too_large",
                         field="body")

    def headers_too_large(self) -> HTTPError:
        """The 431 for request headers over ``max_header_bytes``."""
        return HTTPError(f"request headers are larger than {self.max_header_bytes} bytes; "
                         "send fewer or shorter headers", status=431,
                         code="request_header_fields_too_large", field="headers")

    def request_timed_out(self) -> HTTPError:
        """The 408 for a request that did not arrive whole within ``request_timeout_s``."""
        return HTTPError(f"the request did not arrive within {self.request_timeout_s} s; send "
                         "the headers and the body without pausing (the server's limit is "
                         "HYBRIDML_REQUEST_TIMEOUT_S)", status=408, code="request_timeout",
                         field="body")
