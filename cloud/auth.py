"""Who may call what: the bearer-token check, and the admin endpoints it guards.

:func:`install` (called by ``create_app``) adds a ``before_request`` hook that runs before any
other hook and the admin Blueprint::

    POST /v1/models/<name>/aliases/<alias>   {"version": 3 | "canary" | "latest"}   admin
    POST /v1/models/<name>/rollback          {"alias": "stable", "version": 2}?     admin

Access rules (``Authorization: Bearer <token>``):

* ``/healthz`` is open (load balancers and ``status`` probe it);
* the endpoints in :data:`DEVICE_ENDPOINTS` (model list, manifest, artifacts, predict,
  telemetry, feedback) take a device or an admin token;
* ``/metrics`` (:data:`LOOPBACK_ENDPOINTS`) is open to callers on loopback and takes an
  admin token from anywhere else (behind a reverse proxy on the same host every caller is
  on loopback: keep ``/metrics`` out of what the proxy forwards);
* every other endpoint, including any added later, takes an admin token (deny by default);
* no or an unknown/revoked token is 401, a device token on an admin endpoint 403, both as JSON
  errors from the error tree with a ``WWW-Authenticate: Bearer`` header.

With ``HYBRIDML_INSECURE=1`` (``serve --insecure``, loopback only) no token is checked, so
every caller is an admin; a web page the operator visits must not become one. One hook
(:func:`loopback_only`) then refuses, before anything else runs:

* a ``Host`` that is not a loopback name or address (``localhost``, ``127.x.y.z``, ``[::1]``,
  any port): 403 ``forbidden_host``. DNS rebinding points a hostile name at 127.0.0.1, so the
  browser calls this server as that name's "same origin"; the name stays in ``Host``;
* an ``Origin`` that is not a loopback origin (``http(s)://`` one of those hosts): 403
  ``forbidden_origin`` — a cross-site page;
* a write (POST, PUT, PATCH, DELETE) to an endpoint without ``Content-Type: application/json``:
  415. A form or a ``no-cors`` fetch can send a cross-site POST without asking the server
  first, but only with a form, text or empty content type; a JSON one makes the browser ask
  first (a CORS preflight), which this server never grants.

Admin bodies are strict JSON read by :func:`hybridml.shared.jsontext.loads`: malformed,
non-UTF-8 or absurdly nested bodies are a 400 naming ``body``.

Every promote and rollback (over HTTP or from the CLI) is recorded in the registry's audit trail
with the token that did it. That log is also the rollback history: ``rollback`` without a
version moves ``stable`` back to the version its last recorded move replaced, so a second
rollback undoes the first.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, Flask, Response, g, jsonify, request

from hybridml.shared import jsontext
from hybridml.shared.errors import (
    AuthError,
    ForbiddenError,
    HTTPError,
    InputError,
    NotFoundError,
)
from hybridml.shared.net import is_loopback
from hybridml.shared.settings import env_flag
from hybridml.shared.text import printable

from .registry import Ref, Registry
from .tokens import TokenStore

log = logging.getLogger("hybridml.cloud.auth")

OPEN_ENDPOINTS = frozenset({"healthz", "static"})
DEVICE_ENDPOINTS = frozenset({"list_models", "manifest", "artifact", "predict", "explain",
                              "telemetry", "feedback"})
# Open to callers on this machine (a Prometheus beside the server), admin tokens otherwise.
LOOPBACK_ENDPOINTS = frozenset({"metrics"})
INSECURE_ENV = "HYBRIDML_INSECURE"
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def insecure_from_env(env: Mapping[str, str] | None = None) -> bool:
    """True when ``HYBRIDML_INSECURE`` is on (1/true/yes/on; a typo is a ConfigError)."""
    return env_flag(INSECURE_ENV, False, env)


def install(app: Flask, registry: Registry, *, insecure: bool | None = None) -> None:
    """Guard ``app`` with bearer tokens from ``registry``'s token store; add the admin routes.

    ``insecure`` (default: :func:`insecure_from_env`) turns the check off; ``serve`` only
    allows that on a loopback address.
    """
    off = insecure_from_env() if insecure is None else insecure
    app.register_blueprint(_admin_blueprint(registry))
    if off:
        # No token hooks; one cheap guard against browsers (see loopback_only).
        log.warning("API tokens are NOT checked (insecure mode): every caller is an admin; "
                    "only loopback Host and Origin headers and JSON writes are accepted")
        app.before_request_funcs.setdefault(None, []).insert(0, loopback_only)
        return
    tokens = TokenStore(registry)

    def authenticate() -> None:
        endpoint = request.endpoint
        if endpoint in OPEN_ENDPOINTS or (endpoint in LOOPBACK_ENDPOINTS
                                          and is_loopback(request.remote_addr or "")):
            return
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise AuthError("this endpoint needs 'Authorization: Bearer TOKEN'; create a token "
                            "with 'hybridml-cloud tokens create --role device --name LABEL'")
        info = tokens.authenticate(token)
        if info is None:
            raise AuthError("the bearer token is unknown or revoked; ask for a new one "
                            "('hybridml-cloud tokens create')")
        g.token = info
        # endpoint None: no route matched; let routing answer its 404/405 to any valid token.
        if endpoint is not None and endpoint not in DEVICE_ENDPOINTS and info.role != "admin":
            raise ForbiddenError(f"token {info.id} ({info.name!r}) has role {info.role!r}; "
                                 f"{request.method} {request.path} needs an admin token",
                                 token=info.id)

    def challenge(resp: Response) -> Response:
        if resp.status_code == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="hybridml"'
        elif resp.status_code == 403 and g.get("token") is not None:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="hybridml", ' \
                                               'error="insufficient_scope"'
        return resp

    # First in line: an anonymous caller learns nothing from body or content-type checks.
    app.before_request_funcs.setdefault(None, []).insert(0, authenticate)
    app.after_request(challenge)


# ------------------------------------------------------------------- insecure-mode guard
def loopback_host(host: str) -> bool:
    """True for a ``Host`` header naming loopback: ``localhost``, ``127.x.y.z`` or ``[::1]``,
    with or without a port."""
    # The longest loopback spelling has under 64 characters; shorter ones are remembered,
    # as a client sends the same few values every time.
    return len(host) <= 64 and _loopback_host(host)


def loopback_origin(origin: str) -> bool:
    """True for an ``Origin`` header of a page served from loopback (http or https)."""
    return len(origin) <= 64 and _loopback_origin(origin)


@functools.lru_cache(maxsize=64)
def _loopback_host(host: str) -> bool:
    name, port = host, ""
    if host.startswith("["):  # [v6]:port
        name, sep, port = host[1:].partition("]")
        if not sep or (port and not port.startswith(":")):
            return False
        port = port[1:]
    elif host.count(":") == 1:
        name, port = host.split(":")
    if port and not (port.isascii() and port.isdigit()):
        return False
    return is_loopback(name.removesuffix(".")) if name.strip() == name else False


@functools.lru_cache(maxsize=64)
def _loopback_origin(origin: str) -> bool:
    try:
        parts = urlsplit(origin)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return False
    return (parts.scheme in ("http", "https") and parts.hostname is not None
            and not parts.path and is_loopback(parts.hostname))


def loopback_only() -> None:
    """The insecure mode's guard (a ``before_request`` hook); see the module docstring."""
    environ = request.environ
    host = environ.get("HTTP_HOST")
    if host is not None and not loopback_host(host):
        raise HTTPError(
            f"Host {printable(host, 80)!r} is not a loopback name: this server runs without "
            "tokens (--insecure) and only answers requests addressed to localhost, 127.0.0.1 "
            "or [::1]; otherwise any web page could reach it by DNS rebinding (a hostile name "
            "that resolves to 127.0.0.1). Call it by one of those names, or serve with tokens",
            status=403, code="forbidden_host", field="Host")
    origin = environ.get("HTTP_ORIGIN")
    if origin is not None and not loopback_origin(origin):
        raise HTTPError(
            f"Origin {printable(origin, 80)!r} is not a loopback origin: this server runs "
            "without tokens (--insecure) and refuses requests from web pages served elsewhere "
            "(cross-site requests); serve with tokens to be called from other sites",
            status=403, code="forbidden_origin", field="Origin")
    # endpoint None: no route matched; routing answers its 404/405 and nothing is written.
    if environ.get("REQUEST_METHOD") in WRITE_METHODS and request.endpoint is not None \
            and not request.is_json:
        raise HTTPError("send the body as JSON with 'Content-Type: application/json'",
                        status=415, code="unsupported_media_type", field="Content-Type")


# ------------------------------------------------------------------------- admin actions
class AuditLog:
    """Who moved which alias, and when: the registry's audit trail (its ``audit`` table since
    schema 5; an older ``audit.jsonl`` is imported when the registry is opened).

    It is also the rollback history: the newest entry for an alias says which version it
    replaced. An alias move and its entry commit in one transaction
    (:meth:`Registry.move_alias`).
    """

    def __init__(self, registry: Registry | str | os.PathLike[str]) -> None:
        self.registry = (registry if isinstance(registry, Registry)
                         else Registry(registry, create=False))

    def append(self, entry: dict[str, Any]) -> None:
        """Record one action that is not an alias move."""
        self.registry.add_audit(entry)

    def entries(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every recorded action (of model ``name``), oldest first."""
        return self.registry.audit(name)

    def replaced(self, name: str, alias: str) -> tuple[int | None, int | None]:
        """``(from, to)`` of the newest move of ``alias``, or ``(None, None)``."""
        for e in reversed(self.entries(name)):
            if e.get("alias") == alias:
                return e.get("from"), e.get("to")
        return None, None


def promote(registry: Registry, name: str, alias: str, ref: Ref, *,
            actor: str = "cli") -> tuple[int, int | None]:
    """Point ``alias`` at ``ref`` and record it; returns (new, old) versions."""
    return _move_alias(registry, "promote", name, alias, ref, actor)


def rollback(registry: Registry, name: str, alias: str = "stable", ref: Ref | None = None, *,
             actor: str = "cli") -> tuple[int, int | None]:
    """Move ``alias`` to ``ref``, or back to the version the last recorded move replaced.

    Refuses (NotFoundError) when nothing is recorded, or when the alias was moved without
    being recorded since (the history would be stale): then pass the version.
    """
    if ref is None:
        current = registry.aliases(name).get(alias)
        was, moved_to = AuditLog(registry).replaced(name, alias)
        if was is None or moved_to != current:
            raise NotFoundError(f"no earlier {alias!r} version of {name!r} is recorded; pass "
                                "the version to roll back to", field="version")
        ref = was
    return _move_alias(registry, "rollback", name, alias, ref, actor)


def _move_alias(registry: Registry, action: str, name: str, alias: str, ref: Ref,
                actor: str) -> tuple[int, int | None]:
    """Set ``alias`` and record the move, in one transaction; returns (new, old) versions."""
    version, before = registry.move_alias(name, alias, ref,
                                          audit={"action": action, "by": actor})
    log.warning("%s %s/%s: v%s -> v%d by %s", action, name, alias, before, version, actor)
    return version, before


def _admin_blueprint(registry: Registry) -> Blueprint:
    bp = Blueprint("admin", __name__)

    @bp.post("/v1/models/<name>/aliases/<alias>")
    def promote_alias(name: str, alias: str) -> Response:
        body = admin_body()
        ref = _ref(body.get("version"), required=True)
        assert ref is not None
        version, before = promote(registry, name, alias, ref, actor=_actor())
        return jsonify({"name": name, "alias": alias, "version": version, "previous": before})

    @bp.post("/v1/models/<name>/rollback")
    def rollback_alias(name: str) -> Response:
        body = admin_body()
        alias = body.get("alias", "stable")
        if not isinstance(alias, str):
            raise InputError("'alias' must be a string such as 'stable'", field="alias")
        version, before = rollback(registry, name, alias, _ref(body.get("version")),
                                   actor=_actor())
        return jsonify({"name": name, "alias": alias, "version": version, "previous": before})

    return bp


def admin_body(keys: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The JSON object body of an admin call; an empty body is ``{}``.

    Strict JSON whatever the content type (a token-checked caller need not set it; the
    insecure mode's guard requires it); 400 naming ``body`` for anything else, and, with
    ``keys``, naming a key that is not one of them.
    """
    raw = request.get_data(cache=True)  # over MAX_CONTENT_LENGTH: werkzeug raises 413
    if not raw:
        return {}
    data = jsontext.loads_body(raw)
    if not isinstance(data, dict):
        raise InputError("the body must be a JSON object, e.g. {\"version\": 3}", field="body")
    unknown = [] if keys is None else [k for k in data if k not in keys]
    if unknown:
        shown = printable(str(unknown[0]), 40)
        raise InputError(f"unknown key {shown!r} in the body; known keys: "
                         f"{', '.join(keys or ())}", field=shown)
    return data


def _ref(value: Any, *, required: bool = False) -> Ref | None:
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError("'version' must be a version number, an alias or 'latest', e.g. "
                         "{\"version\": 3}", field="version")
    return value


def _actor() -> str:
    who = g.get("token")
    return f"token {who.id} ({who.name})" if who else f"insecure caller {request.remote_addr}"
