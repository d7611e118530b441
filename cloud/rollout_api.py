"""The admin endpoints of rollouts (docs/rollouts.md; :mod:`hybridml.cloud.rollouts`)::

    POST /v1/models/<name>/rollouts          {"strategy", "candidate"?, "arms"?, "config"?,
                                              "force"?, "reason"?}     -> 201 {"rollout"}
    GET  /v1/models/<name>/rollouts          -> {"rollouts": [...]}, newest first
    GET  /v1/models/<name>/rollout           -> {"rollout", "analysis", "events", "cohorts"}
    POST /v1/models/<name>/rollout/promote   {"reason"?, "force"?, "version"?}
    POST /v1/models/<name>/rollout/abort     {"reason"?}

None of these endpoints is a device endpoint, so :mod:`hybridml.cloud.auth` lets only admin
tokens call them (deny by default). Bodies are strict JSON objects; an unknown key, a wrong
type or a bad setting is a 4xx JSON error naming the field. The acting token is recorded in
every rollout event as ``token:<name>``.

:func:`status_of` is what ``GET .../rollout`` and ``hybridml-cloud rollout status`` show.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, jsonify, request

from hybridml.shared.errors import InputError, NotFoundError

from .auth import admin_body
from .rollouts import Rollout, Rollouts

START_KEYS = ("strategy", "candidate", "arms", "config", "force", "reason")
PROMOTE_KEYS = ("reason", "force", "version")
ABORT_KEYS = ("reason",)
EVENTS_SHOWN = 50
MAX_REASON = 1000


def install(app: Flask, rollouts: Rollouts) -> None:
    """Register the rollout endpoints on ``app``."""
    app.register_blueprint(_blueprint(rollouts))


def status_of(rollouts: Rollouts, telemetry: Any, name: str, now: float,
              *, events: int = EVENTS_SHOWN, rollout_id: int | None = None) -> dict[str, Any]:
    """The latest rollout of ``name`` (or rollout ``rollout_id`` of it) with its analysis
    (running ones only; null when the analysis module is not installed), its newest
    ``events`` and units per arm. NotFoundError when ``name`` never had a rollout."""
    r = rollouts.latest(name) if rollout_id is None else rollouts.get(rollout_id)
    if r is not None and r.name != name:
        raise NotFoundError(f"rollout {rollout_id} is of {r.name!r}, not {name!r}",
                            field="id")
    if r is None:
        rollouts.registry.resolve(name, "latest")  # NotFoundError for an unknown model
        raise NotFoundError(f"{name!r} has no rollout; start one with 'hybridml-cloud rollout "
                            f"start {name} --candidate VERSION --strategy canary'",
                            field="name")
    return {"rollout": r.to_json(), "analysis": analysis_of(rollouts, r, telemetry, now),
            "events": rollouts.events(r.id)[-events:], "cohorts": rollouts.cohorts(r.id)}


def analysis_of(rollouts: Rollouts, rollout: Rollout, telemetry: Any, now: float
                ) -> dict[str, Any] | None:
    """:func:`hybridml.cloud.rollout_analysis.analyse` of a running rollout as JSON; None for
    an ended rollout, without a telemetry store, or without the analysis module."""
    if rollout.state != "running" or telemetry is None:
        return None
    try:
        from .rollout_analysis import analyse
    except ImportError:
        return None
    result: dict[str, Any] = analyse(rollout, rollouts, telemetry, now).to_json()
    return result


def _blueprint(rollouts: Rollouts) -> Blueprint:
    bp = Blueprint("rollouts", __name__)

    @bp.post("/v1/models/<name>/rollouts")
    def start_rollout(name: str) -> tuple[Response, int]:
        body = admin_body(START_KEYS)
        strategy = body.get("strategy")
        if not isinstance(strategy, str):
            raise InputError("'strategy' is required: one of shadow, canary, ab, interleave",
                             field="strategy")
        arms = body.get("arms")
        if arms is not None and not isinstance(arms, list):
            raise InputError("'arms' must be a list of versions, e.g. [4, 5]", field="arms")
        r = rollouts.start(name, strategy, candidate=body.get("candidate"), arms=arms,
                           config=body.get("config"), force=_flag(body, "force"),
                           actor=_actor(), reason=_reason(body))
        return jsonify({"rollout": r.to_json()}), 201

    @bp.get("/v1/models/<name>/rollouts")
    def list_rollouts(name: str) -> Response:
        found = rollouts.list(name)
        if not found:
            rollouts.registry.resolve(name, "latest")  # 404 for an unknown model
        return jsonify({"rollouts": [r.to_json() for r in found]})

    @bp.get("/v1/models/<name>/rollout")
    def rollout_status(name: str) -> Response:
        telemetry = current_app.extensions.get("hybridml", {}).get("telemetry")
        return jsonify(status_of(rollouts, telemetry, name, time.time()))

    @bp.post("/v1/models/<name>/rollout/promote")
    def promote_rollout(name: str) -> Response:
        body = admin_body(PROMOTE_KEYS)
        version = body.get("version")
        if version is not None and (isinstance(version, bool)
                                    or not isinstance(version, (int, str))):
            raise InputError("'version' must be a version number, e.g. {\"version\": 5}",
                             field="version")
        r = rollouts.promote(name, actor=_actor(), reason=_reason(body),
                             force=_flag(body, "force"), version=version)
        return jsonify({"rollout": r.to_json()})

    @bp.post("/v1/models/<name>/rollout/abort")
    def abort_rollout(name: str) -> Response:
        body = admin_body(ABORT_KEYS)
        r = rollouts.abort(name, actor=_actor(), reason=_reason(body))
        return jsonify({"rollout": r.to_json()})

    return bp


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise InputError(f"'{key}' must be true or false", field=key)
    return value


def _reason(body: dict[str, Any]) -> str | None:
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > MAX_REASON):
        raise InputError(f"'reason' must be a string of at most {MAX_REASON} characters",
                         field="reason")
    return reason


def _actor() -> str:
    who = g.get("token")
    return f"token:{who.name}" if who is not None else f"insecure:{request.remote_addr}"


__all__ = ["analysis_of", "install", "status_of"]
