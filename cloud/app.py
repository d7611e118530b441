"""The cloud HTTP API v1 (Flask app factory; gunicorn runs it in production).

::

    GET  /healthz
    GET  /v1/models                               names, aliases, latest versions
    GET  /v1/models/<name>/manifest               ?version=3 | ?alias=canary (default stable)
                                                  ETag; 304 on If-None-Match
    GET  /v1/artifacts/<sha256>                   immutable bytes; Range; gzip when accepted
    POST /v1/models/<name>/predict                {"inputs": [{col: v}, ...] | [[...], ...]}
                                                  -> predictions, probabilities, model_version

Every error is a JSON body ``{"error": {"code", "message", "details"?}}`` with a 4xx status for
bad input; only a bug answers 500.
"""

from __future__ import annotations

import gzip
import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, jsonify, request, send_file
from werkzeug.exceptions import HTTPException

from hybridml.edge.session import ModelSession
from hybridml.shared.errors import ConfigError, HTTPError, HybridMLError, InputError
from hybridml.shared.manifest import Manifest

from .registry import Registry

log = logging.getLogger("hybridml.cloud.app")
IMMUTABLE = "public, max-age=31536000, immutable"


@dataclass(frozen=True)
class ServeConfig:
    """API settings; :meth:`from_env` reads ``HYBRIDML_<FIELD>`` variables."""

    max_batch: int = 1000
    max_body_bytes: int = 4 * 1024 * 1024
    compress_min_bytes: int = 16 * 1024
    model_cache: int = 8

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) < 1:
                raise ConfigError(f"{f.name} must be a positive integer", field=f.name)

    @classmethod
    def from_env(cls, env: Any = None) -> ServeConfig:
        """Build from ``HYBRIDML_MAX_BATCH``, ``HYBRIDML_MAX_BODY_BYTES`` and so on."""
        env = os.environ if env is None else env
        kwargs: dict[str, int] = {}
        for f in fields(cls):
            raw = env.get(f"HYBRIDML_{f.name.upper()}")
            if raw is not None:
                try:
                    kwargs[f.name] = int(raw)
                except ValueError:
                    raise ConfigError(f"HYBRIDML_{f.name.upper()}={raw!r} is not an integer",
                                      field=f.name) from None
        return cls(**kwargs)


class ModelCache:
    """LRU of loaded fp32 sessions keyed by (name, version); thread-safe."""

    def __init__(self, registry: Registry, size: int) -> None:
        self.registry = registry
        self.size = size
        self._items: OrderedDict[tuple[str, int], tuple[Manifest, ModelSession]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, name: str, version: int) -> tuple[Manifest, ModelSession]:
        """The manifest and a loaded session of the version's fp32 model."""
        key = (name, version)
        with self._lock:
            hit = self._items.get(key)
            if hit is not None:
                self._items.move_to_end(key)
                return hit
        manifest = Manifest.from_json(self.registry.manifest(name, version))
        art = manifest.artifact("model_fp32") or manifest.artifact("model")
        assert art is not None
        session = ModelSession(self.registry.blob_path(art.sha256), manifest.schema,
                               manifest.task)
        with self._lock:
            self._items[key] = (manifest, session)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return manifest, session


def create_app(registry: str | os.PathLike[str] | Registry | None = None,
               config: ServeConfig | None = None) -> Flask:
    """Build the API over ``registry`` (default: ``$HYBRIDML_REGISTRY`` or ``./registry``)."""
    reg = registry if isinstance(registry, Registry) else Registry.from_env(registry)
    cfg = config or ServeConfig.from_env()
    app = Flask("hybridml.cloud")
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["hybridml"] = {"registry": reg, "config": cfg}
    models = ModelCache(reg, cfg.model_cache)
    gz_dir = reg.root / "cache" / "gzip"

    @app.before_request
    def _start() -> None:
        g.t0 = time.perf_counter()

    @app.after_request
    def _log(resp: Response) -> Response:
        ms = (time.perf_counter() - g.get("t0", time.perf_counter())) * 1000
        log.info("%s %s %d %.1fms", request.method, request.path, resp.status_code, ms)
        return resp

    @app.errorhandler(HybridMLError)
    def _our_error(exc: HybridMLError) -> tuple[Response, int]:
        return jsonify(exc.to_json()), exc.status

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        message = {413: f"request body is larger than {cfg.max_body_bytes} bytes; send fewer "
                        "rows per request"}.get(status, exc.description or exc.name)
        code = (exc.name or "error").lower().replace(" ", "_")
        return jsonify(HTTPError(message, status=status, code=code).to_json()), status

    @app.errorhandler(Exception)
    def _bug(exc: Exception) -> tuple[Response, int]:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": {"code": "internal",
                                  "message": "internal error; see the server log"}}), 500

    @app.get("/healthz")
    def healthz() -> Response:
        return jsonify({"status": "ok", "models": len(reg.models())})

    @app.get("/v1/models")
    def list_models() -> Response:
        return jsonify({"models": [s.to_json() for s in reg.models()]})

    @app.get("/v1/models/<name>/manifest")
    def manifest(name: str) -> Response:
        ref = _ref()
        etag = reg.manifest_etag(name, ref)
        if request.if_none_match.contains(etag):
            resp = Response(status=304)
        else:
            resp = jsonify(reg.manifest(name, ref))
        resp.set_etag(etag)
        resp.headers["Cache-Control"] = "no-cache"
        return resp

    @app.get("/v1/artifacts/<sha256>")
    def artifact(sha256: str) -> Response:
        path = reg.blob_path(sha256)
        size = path.stat().st_size
        wants_gzip = "gzip" in request.headers.get("Accept-Encoding", "")
        if wants_gzip and request.range is None and size >= cfg.compress_min_bytes:
            gz = _gzipped(gz_dir, path, sha256)
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
        body = _json_body()
        rows = body.get("inputs")
        if not isinstance(rows, list) or not rows:
            raise InputError("'inputs' must be a non-empty list of rows (objects by column "
                             "name, or lists in schema order)", field="inputs")
        if len(rows) > cfg.max_batch:
            raise HTTPError(f"{len(rows)} rows exceed the batch limit of {cfg.max_batch}; "
                            "split the request", status=413, code="batch_too_large",
                            field="inputs")
        ref = body.get("version", request.args.get("version", "stable"))
        if not isinstance(ref, (int, str)) or isinstance(ref, bool):
            raise InputError("'version' must be a version number or an alias", field="version")
        version = reg.resolve(name, ref)
        man, session = models.get(name, version)
        out = session.run(man.schema.encode(rows))
        answer: dict[str, Any] = {"name": name, "model_version": version}
        if out.values is not None:
            answer["predictions"] = [float(v) for v in out.values]
        else:
            classes = list(man.classes or ())
            assert out.labels is not None and out.probabilities is not None
            answer["predictions"] = [classes[int(i)] for i in out.labels]
            answer["probabilities"] = [{str(c): round(float(p), 6) for c, p in zip(classes, ps)}
                                       for ps in out.probabilities]
            answer["classes"] = classes
        return jsonify(answer)

    return app


def _ref() -> str:
    version = request.args.get("version")
    alias = request.args.get("alias")
    if version and alias:
        raise InputError("pass either ?version= or ?alias=, not both", field="version")
    return version or alias or "stable"


def _json_body() -> dict[str, Any]:
    if not request.is_json:
        raise HTTPError("send the body as JSON with 'Content-Type: application/json'",
                        status=415, code="unsupported_media_type")
    data = request.get_json(silent=True)
    if data is None:
        raise InputError("the request body is not valid JSON", field="body")
    if not isinstance(data, dict):
        raise InputError("the request body must be a JSON object with 'inputs'", field="body")
    return data


def _gzipped(cache: Path, path: Path, sha256: str) -> Path | None:
    """A gzip copy of an artifact (made once, atomically); None if it would not be smaller."""
    gz = cache / f"{sha256}.gz"
    skip = cache / f"{sha256}.raw"
    if gz.exists():
        return gz
    if skip.exists():
        return None
    cache.mkdir(parents=True, exist_ok=True)
    data = gzip.compress(path.read_bytes(), compresslevel=6, mtime=0)
    if len(data) > 0.9 * path.stat().st_size:
        skip.touch()
        return None
    tmp = cache / f".{sha256}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, gz)
    return gz
