"""Who may call what: the bearer-token check, and the admin endpoints it guards.

:func:`install` (called by ``create_app``) adds a ``before_request`` hook that runs before any
other hook and the admin Blueprint::

    POST /v1/models/<name>/aliases/<alias>   {"version": 3 | "canary" | "latest"}   admin
    POST /v1/models/<name>/rollback          {"alias": "stable", "version": 2}?     admin

Access rules (``Authorization: Bearer <token>``):

* ``/healthz`` is open (load balancers and ``status`` probe it);
* the endpoints in :data:`DEVICE_ENDPOINTS` (model list, manifest, artifacts, predict,
  telemetry) take a device or an admin token;
* every other endpoint, including any added later, takes an admin token (deny by default);
* no or an unknown/revoked token is 401, a device token on an admin endpoint 403, both as JSON
  errors from the error tree with a ``WWW-Authenticate: Bearer`` header.

With ``HYBRIDML_INSECURE=1`` (``serve --insecure``, loopback only) nothing is checked.

Every promote and rollback (over HTTP or from the CLI) is appended to ``<registry>/audit.jsonl``
with the token that did it. That log is also the rollback history: ``rollback`` without a
version moves ``stable`` back to the version its last recorded move replaced, so a second
rollback undoes the first.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flask import Blueprint, Flask, Response, g, jsonify, request

from hybridml.shared.clock import utc_iso
from hybridml.shared.errors import AuthError, ForbiddenError, InputError, NotFoundError
from hybridml.shared.settings import env_flag

from .registry import Ref, Registry
from .tokens import TokenStore

log = logging.getLogger("hybridml.cloud.auth")

OPEN_ENDPOINTS = frozenset({"healthz", "static"})
DEVICE_ENDPOINTS = frozenset({"list_models", "manifest", "artifact", "predict", "telemetry"})
INSECURE_ENV = "HYBRIDML_INSECURE"
AUDIT_NAME = "audit.jsonl"


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
        # No hooks at all: nothing to check, and every request would still pay for the calls.
        log.warning("API tokens are NOT checked (insecure mode): every caller is an admin")
        return
    tokens = TokenStore(registry.root)

    def authenticate() -> None:
        endpoint = request.endpoint
        if endpoint in OPEN_ENDPOINTS:
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


# ------------------------------------------------------------------------- admin actions
class AuditLog:
    """Append-only JSON lines of alias moves (``<registry>/audit.jsonl``): who, what, when.

    It is also the rollback history: the newest entry for an alias says which version it
    replaced. Lines are appended under an exclusive ``flock`` and fsynced.
    """

    def __init__(self, registry_root: str | os.PathLike[str]) -> None:
        self.path = Path(registry_root).expanduser().resolve() / AUDIT_NAME

    def append(self, entry: dict[str, Any]) -> None:
        """Record one action."""
        line = (json.dumps(entry, sort_keys=True) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self, name: str | None = None) -> list[dict[str, Any]]:
        """Every recorded action (of model ``name``), oldest first; torn lines are skipped."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out = []
        for line in lines:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and (name is None or entry.get("name") == name):
                out.append(entry)
        return out

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
        was, moved_to = AuditLog(registry.root).replaced(name, alias)
        if was is None or moved_to != current:
            raise NotFoundError(f"no earlier {alias!r} version of {name!r} is recorded; pass "
                                "the version to roll back to", field="version")
        ref = was
    return _move_alias(registry, "rollback", name, alias, ref, actor)


def _move_alias(registry: Registry, action: str, name: str, alias: str, ref: Ref,
                actor: str) -> tuple[int, int | None]:
    """Set ``alias`` and append the move to the audit log; returns (new, old) versions."""
    before = registry.aliases(name).get(alias)
    version = registry.set_alias(name, alias, ref)
    AuditLog(registry.root).append({"time": utc_iso(), "action": action, "name": name,
                                    "alias": alias, "from": before, "to": version,
                                    "by": actor})
    log.warning("%s %s/%s: v%s -> v%d by %s", action, name, alias, before, version, actor)
    return version, before


def _admin_blueprint(registry: Registry) -> Blueprint:
    bp = Blueprint("admin", __name__)

    @bp.post("/v1/models/<name>/aliases/<alias>")
    def promote_alias(name: str, alias: str) -> Response:
        body = _body()
        ref = _ref(body.get("version"), required=True)
        assert ref is not None
        version, before = promote(registry, name, alias, ref, actor=_actor())
        return jsonify({"name": name, "alias": alias, "version": version, "previous": before})

    @bp.post("/v1/models/<name>/rollback")
    def rollback_alias(name: str) -> Response:
        body = _body()
        alias = body.get("alias", "stable")
        if not isinstance(alias, str):
            raise InputError("'alias' must be a string such as 'stable'", field="alias")
        version, before = rollback(registry, name, alias, _ref(body.get("version")),
                                   actor=_actor())
        return jsonify({"name": name, "alias": alias, "version": version, "previous": before})

    return bp


def _body() -> dict[str, Any]:
    """The JSON object body of an admin call; an empty body is ``{}``."""
    if not request.get_data(cache=True):
        return {}
    data = request.get_json(silent=True, force=True)
    if not isinstance(data, dict):
        raise InputError("the body must be a JSON object, e.g. {\"version\": 3}", field="body")
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
