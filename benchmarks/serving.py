"""Item 6: cloud serving — single-row ``POST`` predict at fixed concurrency.

Three servers on the same model, one after another, each loaded by a generator in its own
process (wrk when installed, else :mod:`benchmarks.loadgen`): our API under gunicorn with 2
workers (validation and logging on), our API on Flask's development server, and a bare Flask +
onnxruntime endpoint under gunicorn with 2 workers — the floor.

Each server runs as it would in production, which is its fastest setup here: the floor with
gunicorn's sync workers (its gthread workers measured slower on 2 cores), ours with
``hybridml-cloud serve``'s defaults (``SheddingWorker``: gthread with a buffering front for
slow clients, kept-alive connections, bounded queue). The result records each one's setup
next to its numbers.
"""

from __future__ import annotations

import json
import statistics
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


def _check(server: Server, path: str, body: str) -> None:
    import requests

    ok = requests.post(server.url + path, data=body, timeout=10,
                       headers={"Content-Type": "application/json"})
    if ok.status_code != 200:
        raise RuntimeError(f"{server.cmd[0]} answered {ok.status_code}: {ok.text[:300]}")


def _measure(server: Server, path: str, body: str, connections: int, seconds: float,
             max_requests: int, use_wrk: bool) -> dict[str, Any]:
    """One load run against a started server, with the server's CPU seconds."""
    cpu0, t0 = server.cpu_seconds(), time.perf_counter()
    res = load(server.url + path, body, connections, seconds, max_requests, use_wrk)
    res["server_cpu_s"] = round(server.cpu_seconds() - cpu0, 3)
    res["wall_s"] = round(time.perf_counter() - t0, 3)
    res.pop("raw", None)
    return res


def _combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one server: medians of the rates and percentiles, totals of the counts."""
    out: dict[str, Any] = {"tool": runs[0].get("tool"), "rounds": len(runs)}
    for key in ("rps", "p50_ms", "p99_ms"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        out[key] = round(statistics.median(vals), 3) if vals else None
    for key in ("requests", "errors", "server_cpu_s", "wall_s"):
        out[key] = round(sum(r.get(key) or 0 for r in runs), 3)
    out["rps_rounds"] = [r.get("rps") for r in runs]
    return out


def run(model: Model, *, connections: int, seconds: float, max_requests: int,
        use_wrk: bool = True, rounds: int = 3) -> dict[str, Any]:
    """req/s, p50 and p99 of the three servers.

    The floor and our gunicorn server run side by side and are loaded in turn for ``rounds``
    rounds of ``seconds`` each (the dev server once): a burst of noise on the shared machine
    then moves one round, not the verdict. The ratio is the median of the per-round ratios.
    """
    from hybridml.shared.manifest import Manifest

    schema = Manifest.from_json(model.manifest).schema
    num_idx = [schema.names.index(n) for n in schema.numeric_names]
    cat_idx = [schema.names.index(n) for n in schema.categorical_names]
    body = json.dumps({"inputs": [_body_list(model)]})
    api = f"/v1/models/{model.name}/predict"
    from hybridml.cloud.config import ServeConfig

    threads = ServeConfig.from_env().threads
    setups = {"floor_gunicorn": "gunicorn sync, 2 workers, no validation, no logging",
              "hybridml_gunicorn": f"hybridml-cloud serve --verbose: SheddingWorker (gthread "
                                   f"with a buffering front), 2 workers x {threads} threads, "
                                   "keep-alive, request log on",
              "hybridml_flask_dev": "hybridml-cloud serve --dev: Flask's threaded dev server"}
    paired = {"floor_gunicorn": (floor(model.onnx_path, num_idx, cat_idx), "/predict"),
              "hybridml_gunicorn": (cloud(model.registry), api)}
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in paired}
    with paired["floor_gunicorn"][0], paired["hybridml_gunicorn"][0]:
        for server, path in paired.values():
            _check(server, path, body)
            load(server.url + path, body, connections, min(1.0, seconds), max_requests,
                 use_wrk)  # warm-up
        for r in range(rounds):
            for name, (server, path) in paired.items():
                log(f"serving: {name} round {r + 1}/{rounds}")
                runs[name].append(_measure(server, path, body, connections, seconds,
                                           max_requests, use_wrk))
    results: dict[str, Any] = {k: _combine(v) for k, v in runs.items()}
    log("serving: hybridml_flask_dev")
    dev = cloud(model.registry, dev=True)
    with dev:
        _check(dev, api, body)
        load(dev.url + api, body, connections, min(1.0, seconds), max_requests, use_wrk)
        results["hybridml_flask_dev"] = _combine(
            [_measure(dev, api, body, connections, seconds, max_requests, use_wrk)])
    for name, res in results.items():
        res["setup"] = setups[name]
    per_round = [ratio(o.get("rps", 0.0), f.get("rps", 0.0))
                 for o, f in zip(runs["hybridml_gunicorn"], runs["floor_gunicorn"])]
    rounds_ok = [x for x in per_round if x is not None]
    return {"model": model.name, "connections": connections, "seconds": seconds,
            "rounds": rounds, "generator": results["floor_gunicorn"].get("tool"),
            "servers": results, "ratio_rounds": per_round,
            "ratio_gunicorn_vs_floor": round(statistics.median(rounds_ok), 3) if rounds_ok
            else None,
            "ratio_dev_vs_floor": ratio(results["hybridml_flask_dev"].get("rps", 0.0),
                                        results["floor_gunicorn"].get("rps", 0.0))}
