"""Item 6: cloud serving — single-row ``POST`` predict at fixed concurrency.

Three servers on the same model, one after another, each loaded by a generator in its own
process (wrk when installed, else :mod:`benchmarks.loadgen`): our API under gunicorn with 2
workers (validation and logging on), our API on Flask's development server, and a bare Flask +
onnxruntime endpoint under gunicorn with 2 workers — the floor.

Each server runs as it would in production, which is its fastest setup here: the floor with
gunicorn's sync workers (its gthread workers measured slower on 2 cores), ours with
``hybridml-cloud serve``'s defaults (``SheddingWorker``: gthread, kept-alive connections,
bounded queue). The result records each one's setup next to its numbers.
"""

from __future__ import annotations

import json
import time
from typing import Any

from .common import log, ratio
from .loadgen import load
from .servers import Server, cloud, floor
from .workspace import Model


def _body_list(model: Model) -> list[Any]:
    from hybridml.shared.manifest import Manifest

    schema = Manifest.from_json(model.manifest).schema
    row = model.miss_row
    return [row[n] for n in schema.names] if isinstance(row, dict) else list(row)


def _measure(server: Server, path: str, body: str, connections: int, seconds: float,
             max_requests: int, use_wrk: bool) -> dict[str, Any]:
    import requests

    with server:
        ok = requests.post(server.url + path, data=body, timeout=10,
                           headers={"Content-Type": "application/json"})
        if ok.status_code != 200:
            raise RuntimeError(f"{server.cmd[0]} answered {ok.status_code}: {ok.text[:300]}")
        load(server.url + path, body, connections, min(1.0, seconds), max_requests, use_wrk)
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        res = load(server.url + path, body, connections, seconds, max_requests, use_wrk)
        res["server_cpu_s"] = round(server.cpu_seconds() - cpu0, 3)
        res["wall_s"] = round(time.perf_counter() - t0, 3)
    res.pop("raw", None)
    return res


def run(model: Model, *, connections: int, seconds: float, max_requests: int,
        use_wrk: bool = True) -> dict[str, Any]:
    """req/s, p50 and p99 of the three servers."""
    from hybridml.shared.manifest import Manifest

    schema = Manifest.from_json(model.manifest).schema
    num_idx = [schema.names.index(n) for n in schema.numeric_names]
    cat_idx = [schema.names.index(n) for n in schema.categorical_names]
    body = json.dumps({"inputs": [_body_list(model)]})
    api = f"/v1/models/{model.name}/predict"
    from hybridml.cloud.app import ServeConfig

    threads = ServeConfig.from_env().threads
    setups = {"floor_gunicorn": "gunicorn sync, 2 workers, no validation, no logging",
              "hybridml_gunicorn": f"hybridml-cloud serve: SheddingWorker (gthread), 2 workers "
                                   f"x {threads} threads, keep-alive",
              "hybridml_flask_dev": "hybridml-cloud serve --dev: Flask's threaded dev server"}
    results: dict[str, Any] = {}
    for name, server, path in (
            ("floor_gunicorn", floor(model.onnx_path, num_idx, cat_idx), "/predict"),
            ("hybridml_gunicorn", cloud(model.registry), api),
            ("hybridml_flask_dev", cloud(model.registry, dev=True), api)):
        log(f"serving: {name}")
        results[name] = _measure(server, path, body, connections, seconds, max_requests,
                                 use_wrk)
        results[name]["setup"] = setups[name]
    rps = {k: v.get("rps", 0.0) for k, v in results.items()}
    return {"model": model.name, "connections": connections, "seconds": seconds,
            "generator": results["floor_gunicorn"].get("tool"), "servers": results,
            "ratio_gunicorn_vs_floor": ratio(rps["hybridml_gunicorn"], rps["floor_gunicorn"]),
            "ratio_dev_vs_floor": ratio(rps["hybridml_flask_dev"], rps["floor_gunicorn"])}
