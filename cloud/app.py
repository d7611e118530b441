"""The cloud HTTP API v1 (Flask app factory; gunicorn runs it in production).

::

    GET  /healthz
    GET  /v1/models                               names, aliases, latest versions
    GET  /v1/models/<name>/manifest               ?version=3 | ?alias=canary (default stable)
                                                  ETag; 304 on If-None-Match; in a running
                                                  rollout, per device (docs/rollouts.md §3);
                                                  direct artifact URLs in ``sources`` with
                                                  --artifact-urls (docs/storage.md §3)
    GET  /v1/artifacts/<sha256>                   immutable bytes; Range; gzip when accepted
    POST /v1/models/<name>/predict                {"inputs": [{col: v}, ...] | [[...], ...]}
                                                  -> predictions, probabilities, model_version
    POST /v1/models/<name>/explain                the same body (at most 50 rows); ?method=
                                                  device -> attributions per column (shap)
    POST /v1/telemetry                            {"records": [...], "dropped": {...}?}
    POST /v1/models/<name>/feedback               {"records": [...]}
                                                  -> accepted, duplicates, refused (ids)
    GET  /metrics                                 Prometheus text (hybridml.cloud.prom)

Manifests are signed (:mod:`hybridml.cloud.signing`); bearer tokens and the admin routes
(promote, rollback) are in :mod:`hybridml.cloud.auth`, the rollout admin routes in
:mod:`hybridml.cloud.rollout_api`. Telemetry and feedback are checked by
:mod:`hybridml.cloud.ingest` and kept by :mod:`hybridml.cloud.telemetry` (docs/monitoring.md).

Every error is a JSON body ``{"error": {"code", "message", "details"?}}`` with a 4xx status for
bad input; only a bug answers 500. Bodies are strict JSON (``NaN``/``Infinity`` literals are
refused, ``null`` means missing); malformed ``Range`` headers are ignored (RFC 9110 §14.2) and
a range past the end is 416. A full worker answers 503 + ``Retry-After`` instead of queueing
without bound (:mod:`hybridml.cloud.shedding`; ``SheddingWorker`` in :mod:`hybridml.cloud.serve`).

Predict is the hot path, so it does per request only what depends on the request: the alias
is resolved from a per-thread memo that any commit to the registry invalidates
(:meth:`Registry.resolve_cached`), each version's predictor (manifest, schema, session,
class names) is built once (:mod:`hybridml.cloud.predictors`), and the answer is encoded by
one prebuilt JSON encoder.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import time
from typing import Any

from flask import Flask, Request, Response, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from hybridml.shared import jsontext
from hybridml.shared.errors import (
    HTTPError,
    HybridMLError,
    InputError,
    NotFoundError,
)
from hybridml.shared.release import Release, issue_window
from hybridml.shared.text import printable

from . import auth, prom
from .config import ServeConfig
from .explain_api import Explanations
from .ingest import parse_upload
from .online import UNIT_HEADER, CloudShadow, Online
from .predictors import ModelCache
from .registry import Ref, Registry
from .rollout_api import install as install_rollouts
from .rollouts import Assignment, Rollouts
from .shedding import LoadShedder
from .signing import Signer
from .sources import DirectSources
from .storage import Storage
from .telemetry import TelemetryStore

log = logging.getLogger("hybridml.cloud.app")
IMMUTABLE = "public, max-age=31536000, immutable"
BODY_KEYS = ("inputs", "version")
MAX_NAME = 64  # the registry's limit on model names
DEVICE_HEADER = "Hybridml-Device"  # the store id a device sends (rollout unit without tokens)
# A version number or an alias (the registry's own rules, checked here to answer 400 early).
_REF_RE = re.compile(r"[0-9]{1,18}|[a-z][a-z0-9_]{0,31}")
_RANGE_RE = re.compile(r"bytes=([0-9]*)-([0-9]*)", re.IGNORECASE)
# Flask's JSON responses, byte for byte (compact, ASCII, keys in insertion order, a newline),
# without building an encoder per call as json.dumps(..., separators=...) does.
_ENCODER = json.JSONEncoder(separators=(",", ":"))


def create_app(registry: str | os.PathLike[str] | Registry | None = None,
               config: ServeConfig | None = None) -> Flask:
    """Build the API over ``registry`` (default: ``$HYBRIDML_REGISTRY`` or ``./registry``)."""
    reg = registry if isinstance(registry, Registry) else Registry.from_env(registry)
    cfg = config or ServeConfig.from_env()
    app = Flask("hybridml.cloud")
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    # Outermost: sheds before Flask runs, and logs one line per admitted request.
    app.wsgi_app = LoadShedder(app.wsgi_app, cfg)  # type: ignore[method-assign]
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["hybridml"] = {"registry": reg, "config": cfg}
    models = ModelCache(reg, cfg.model_cache)
    signer = Signer(reg)  # signs every manifest served (hybridml.cloud.signing)
    rollouts = Rollouts(reg)  # per-device roles in a running rollout (docs/rollouts.md)
    # Direct artifact URLs in served manifests (docs/storage.md §3): signed with the body,
    # never part of the ETag, so a 304 keeps the URLs a device has.
    storage = getattr(reg, "storage", None) or Storage.from_env()
    sources = DirectSources(reg.blobs, storage)
    app.extensions["hybridml"]["rollouts"] = rollouts
    gz_dir = reg.gzip_cache

    # No per-request timing/logging hooks here: LoadShedder, the outermost layer, writes the
    # one line per request, and costs nothing more when INFO is off.
    @app.url_value_preprocessor
    def _short_names(endpoint: str | None, values: dict[str, Any] | None) -> None:
        # The registry's own message quotes the name twice: keep a huge one out of it.
        name = (values or {}).get("name")
        if isinstance(name, str) and len(name) > MAX_NAME:
            raise NotFoundError(f"no model can exist under a {len(name)}-character name; "
                                f"model names have 1-{MAX_NAME} characters", field="name")

    @app.errorhandler(HybridMLError)
    def _our_error(exc: HybridMLError) -> tuple[Response, int]:
        return jsonify(_clipped(exc.to_json())), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        if status == 413:  # word for word what the worker answers before reading the body
            error = cfg.body_too_large()
        else:
            error = HTTPError(exc.description or exc.name, status=status,
                              code=(exc.name or "error").lower().replace(" ", "_"),
                              field={405: "method"}.get(status))
        resp = jsonify(error.to_json())
        for key, value in exc.get_headers():  # Allow on 405, Retry-After, Content-Range
            if key.lower() != "content-type":
                resp.headers[key] = value
        return resp, status

    @app.errorhandler(Exception)
    def _bug(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error on %s %s", printable(request.method, 20),
                      printable(request.path))
        return jsonify({"error": {"code": "internal",
                                  "message": "internal error; see the server log"}}), 500

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok", "models": len(reg.models())})

    @app.get("/v1/models")
    def list_models() -> Response:
        return jsonify({"models": [s.to_json() for s in reg.models()]})

    def _placed(name: str, unit: str | None) -> Assignment | None:
        """The unit's place in the running rollout; None (stable, logged) when there is no
        unit, no rollout, or the rollout cannot be read: a broken rollout must not keep the
        fleet from syncing stable."""
        if unit is None:
            return None
        try:
            return rollouts.assign(name, unit)
        except HybridMLError as exc:
            if isinstance(exc, NotFoundError):
                raise
            log.error("%s: the running rollout cannot be read (%s); serving stable",
                      printable(name), exc.message)
            return None

    @app.get("/v1/models/<name>/manifest")
    def manifest(name: str) -> Response:
        ref = _ref(request)
        served = reg.served_cached(name, ref)
        # Re-signed on a fixed grid: every worker and replica serves the same bytes (and
        # ETag) within a period, and a device sees a new issued-at at least once per period.
        issued, expires = issue_window(time.time(), cfg.manifest_lifetime_s)
        if ref == "stable":  # only the default takes part in a rollout (docs/rollouts.md §3)
            place = _placed(name, _unit(request))
            if place is not None and place.in_cohort:
                return _rollout_manifest(name, place, issued, expires)
        etag = signer.etag(f"{served.etag[:40]}.{served.sequence}.{int(issued)}.{ref}")
        if request.if_none_match.contains(etag):
            resp = Response(status=304)
        else:
            doc = json.loads(served.manifest)
            doc["release"] = Release(served.name, str(ref), served.version, served.sequence,
                                     issued, expires).to_json()
            if sources.enabled:
                sources.add(doc, doc)
            resp = jsonify(signer.sign(doc))
        resp.set_etag(etag)
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    def _rollout_manifest(name: str, place: Assignment, issued: float, expires: float
                          ) -> Response:
        """The served version's manifest with its signed ``rollout`` block; ``ref`` stays
        ``stable``, the alias the device asked for."""
        served = reg.served_cached(name, place.serve)
        rollout = place.rollout
        etag = signer.etag(f"{served.etag[:40]}.{served.sequence}.{int(issued)}.stable."
                           f"{rollout.id}.{place.role}.{place.serve}.{place.companion}")
        if request.if_none_match.contains(etag):
            resp = Response(status=304)
        else:
            doc = json.loads(served.manifest)
            doc["release"] = Release(served.name, "stable", served.version, served.sequence,
                                     issued, expires).to_json()
            companion = (None if place.companion is None
                         else reg.manifest(name, place.companion))
            doc["rollout"] = place.block(companion)
            if sources.enabled:  # one map for both: the companion carries no delivery keys
                sources.add(doc, doc, companion)
            resp = jsonify(signer.sign(doc))
        resp.set_etag(etag)
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    @app.get("/v1/artifacts/<sha256>")
    def artifact(sha256: str) -> Response:
        path = reg.blob_path(sha256)
        size = path.stat().st_size
        try:
            byte_range = _byte_range(request.headers.get("Range"), size)
        except HTTPError as exc:
            resp = jsonify(exc.to_json())
            resp.status_code = exc.status
            resp.headers["Content-Range"] = f"bytes */{size}"
            return resp
        # werkzeug's send_file reads the header itself: hand it only the normalised range.
        if byte_range is None:
            request.environ.pop("HTTP_RANGE", None)
        else:
            request.environ["HTTP_RANGE"] = f"bytes={byte_range[0]}-{byte_range[1]}"
        wants_gzip = "gzip" in request.headers.get("Accept-Encoding", "")
        if wants_gzip and byte_range is None and size >= cfg.compress_min_bytes:
            gz = reg.blobs.gzipped(sha256, gz_dir)  # made once, by one process
            if gz is not None:
                resp = send_file(gz, mimetype="application/octet-stream", conditional=False,
                                 etag=False)
                resp.headers["Content-Encoding"] = "gzip"
                resp.headers["Vary"] = "Accept-Encoding"
                resp.headers["Cache-Control"] = IMMUTABLE
                resp.set_etag(sha256 + "-gz")
                return resp
        resp = send_file(path, mimetype="application/octet-stream", conditional=True,
                         etag=sha256, max_age=None)
        resp.headers["Cache-Control"] = IMMUTABLE
        resp.headers["Accept-Ranges"] = "bytes"
        resp.headers["Vary"] = "Accept-Encoding"
        return resp

    @app.post("/v1/models/<name>/predict")
    def predict(name: str) -> Response:
        req: Request = request._get_current_object()  # type: ignore[attr-defined]
        body = _json_body(req)
        rows = body.get("inputs")
        if not isinstance(rows, list) or not rows:
            raise InputError("'inputs' must be a non-empty list of rows (objects by column "
                             "name, or lists in schema order)", field="inputs")
        if len(rows) > cfg.max_batch:
            raise HTTPError(f"{len(rows)} rows exceed the batch limit of {cfg.max_batch}; "
                            "split the request", status=413, code="batch_too_large",
                            field="inputs", max_batch=cfg.max_batch)
        ref = _check_ref(body["version"], "version") if "version" in body else _ref(req)
        if ref != "stable":  # an explicit version or alias never takes part in a rollout
            answer = models.get(name, reg.resolve_cached(name, ref)).answer(rows)
            return Response(_ENCODER.encode(answer) + "\n", mimetype="application/json")
        # A running rollout may pick the version (A/B by Hybridml-Unit) or shadow the call
        route = online.route(name, lambda: reg.resolve_cached(name, "stable"),
                             req.headers.get(UNIT_HEADER))
        predictor = models.get(name, route.version)
        if route.shadow is None:
            answer = predictor.answer(rows)
        else:
            batch, out = predictor.run(rows)
            answer = predictor.shape(out)
            online.shadow.submit(route.shadow, predictor, rows, batch, out)
        if route.arm is not None:
            answer["arm"] = route.arm
        return Response(_ENCODER.encode(answer) + "\n", mimetype="application/json")

    explanations = Explanations(reg, models)  # shap, imported on the first call

    @app.post("/v1/models/<name>/explain")
    def explain(name: str) -> Response:  # docs/quality.md §3; body as /predict's
        body = _json_body(request)
        ref = _check_ref(body["version"], "version") if "version" in body else _ref(request)
        answer = explanations.answer(name, reg.resolve_cached(name, ref), body.get("inputs"),
                                     request.args.get("method"))
        return Response(_ENCODER.encode(answer) + "\n", mimetype="application/json")

    # Monitoring (docs/monitoring.md §5): spool uploads and feedback into the telemetry store.
    store = TelemetryStore(reg)
    app.extensions["hybridml"]["telemetry"] = store
    # /predict's part in rollouts (hybridml.cloud.online): A/B arms by unit, cloud shadowing.
    online = Online(rollouts, CloudShadow(models, store))
    app.extensions["hybridml"]["online"] = online
    atexit.register(online.shadow.close)  # the last window's shadow counts

    @app.post("/v1/telemetry")
    def telemetry() -> Response:
        upload = parse_upload(_json_data(request))
        return jsonify(store.ingest_summaries(_device(), upload.records,
                                              upload.dropped).to_json())

    @app.post("/v1/models/<name>/feedback")
    def feedback(name: str) -> Response:
        upload = parse_upload(_json_data(request), keys=("records",))
        return jsonify(store.add_feedback(name, _device(), upload.records).to_json())

    prom.install(app, store)  # GET /metrics and request counts (hybridml.cloud.prom)
    install_rollouts(app, rollouts)  # admin: start, status, promote, abort (rollout_api)
    auth.install(app, reg)  # bearer tokens + admin routes (hybridml.cloud.auth)
    return app


def _ref(req: Request) -> Ref:
    """The version asked for by ``?version=`` or ``?alias=`` (default ``stable``)."""
    if not req.query_string:
        return "stable"  # the common case, without parsing a query string
    args = req.args
    for key in ("version", "alias"):
        if len(args.getlist(key)) > 1:
            raise InputError(f"?{key}= is given more than once; pass it once", field=key)
    version = args.get("version")
    alias = args.get("alias")
    if version is not None and alias is not None:
        raise InputError("pass either ?version= or ?alias=, not both", field="version")
    if version is not None:
        return _check_ref(version, "version")
    if alias is not None:
        return _check_ref(alias, "alias")
    return "stable"


def _check_ref(value: object, field: str) -> Ref:
    """A version number or an alias; 400 naming ``field`` for anything else."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 10**18:
        return value
    if isinstance(value, str) and _REF_RE.fullmatch(value):
        return value
    raise InputError(f"{field} {_short(value)} is not a version number (1, 2, ...) or an alias "
                     "(lowercase letters, digits and '_', such as 'stable')", field=field)


def _unit(req: Request) -> str | None:
    """Who asks for a manifest, for rollout assignment: the token's name, or without tokens
    the store id in ``Hybridml-Device`` when it is well formed (1-64 printable characters)."""
    token = g.get("token")
    if token is not None:
        return str(token.name)
    device = req.headers.get(DEVICE_HEADER)
    return device if device and len(device) <= 64 and device.isprintable() else None


def _device() -> str | None:
    """The device sending telemetry: its token's name (None without tokens: the store id in
    each record's id names it)."""
    token = g.get("token")
    return None if token is None else str(token.name)


def _json_body(req: Request) -> dict[str, Any]:
    """The request body as a JSON object with known keys; 4xx naming what is wrong."""
    data = _json_data(req)
    if not isinstance(data, dict):
        raise InputError("the request body must be a JSON object with 'inputs'", field="body")
    unknown = [k for k in data if k not in BODY_KEYS]
    if unknown:
        raise InputError(f"unknown key {_short(unknown[0])} in the request body; send "
                         "'inputs' and optionally 'version'", field=printable(unknown[0], 80))
    return data


def _json_data(req: Request) -> Any:
    """The request body parsed as strict JSON; 415 without a JSON content type, 413 over
    the body limit, 400 naming ``body`` for anything that is not JSON."""
    if not req.is_json:
        raise HTTPError("send the body as JSON with 'Content-Type: application/json'",
                        status=415, code="unsupported_media_type", field="Content-Type")
    raw = req.get_data()  # over MAX_CONTENT_LENGTH: werkzeug raises 413
    if req.content_length is None:
        limit = req.max_content_length
        if limit is not None and len(raw) >= limit:
            raise RequestEntityTooLarge()  # werkzeug cuts a chunked body at the limit silently
    # Strict JSON, as the edge CLI reads it: a NaN literal is refused by the row rules.
    return jsontext.loads_body(raw)


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The one byte range to serve, or None for the whole artifact (RFC 9110 §14).

    Other units, several ranges, and malformed or backwards ranges are ignored — the RFC
    lets a server ignore ``Range``, and a full 200 is always correct. A well-formed range
    that starts past the end, or an empty suffix, is unsatisfiable: 416.
    """
    if header is None:
        return None
    m = _RANGE_RE.fullmatch(header.replace(" ", ""))
    if m is None or not (m.group(1) or m.group(2)):
        return None
    first, last = (_bounded_int(g) if g else None for g in m.groups())
    unsatisfiable = HTTPError(f"Range {_short(header)} is past the end of the {size}-byte "
                              "artifact; ask for bytes=0- or drop the Range header",
                              status=416, code="range_not_satisfiable", field="Range")
    if first is None:  # a suffix: the last N bytes
        assert last is not None
        if last == 0:
            raise unsatisfiable
        return max(size - last, 0), size - 1
    if last is not None and last < first:
        return None
    if first >= size:
        raise unsatisfiable
    return first, size - 1 if last is None else min(last, size - 1)


def _bounded_int(digits: str) -> int:
    # int() refuses more than 4300 digits; anything past 10**18 is past every artifact anyway.
    return int(digits) if len(digits) <= 18 else 10**18


def _short(value: object, limit: int = 60) -> str:
    """``repr(value)``, cut to ``limit`` characters: errors must not echo megabytes back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "...'"


def _clipped(payload: dict[str, Any], limit: int = 500) -> dict[str, Any]:
    """Cut an error body's long strings (a row's value echoed in a message can be huge)."""
    body = payload["error"]
    if len(body["message"]) > limit:
        body["message"] = body["message"][:limit] + "..."
    if "details" in body:  # a copy: the dict is the exception's own
        body["details"] = {k: v[:80] + "..." if isinstance(v, str) and len(v) > 80 else v
                           for k, v in body["details"].items()}
    return payload

