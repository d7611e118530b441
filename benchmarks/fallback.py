"""Item 9: the cost of a fallback — live cloud, refused connection, and a hung cloud.

The row is the model's miss row with its first numeric feature pushed far outside the training
range, so the policy sends it to the cloud. Contenders: the same row with no cloud configured
(local, degraded: the floor), with a live cloud (gunicorn), with a closed port (connection
refused) and with a socket that accepts and never answers (the 250 ms timeout). For the dead
clouds the first call pays the failure; the circuit breaker must keep every later call at
local latency.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import numpy as np

from .common import Stats, log, ratio, time_calls
from .servers import cloud
from .workspace import Model


def odd_row(model: Model) -> Any:
    """The miss row with the first numeric feature far out of range."""
    from hybridml.shared.manifest import Manifest

    schema = Manifest.from_json(model.manifest).schema
    name = schema.numeric_names[0]
    hi = schema.features[schema.names.index(name)].max or 0.0
    value = float(hi) * 10 + 1000.0
    if isinstance(model.miss_row, dict):
        return dict(model.miss_row, **{name: value})
    row = list(model.miss_row)
    row[schema.names.index(name)] = value
    return row


def _first_then_rest(rt: Any, row: Any, calls: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    first = rt.predict([row])[0]
    first_ms = (time.perf_counter() - t0) * 1000
    rest = time_calls({"rest": lambda: rt.predict([row])}, calls=calls, warmup=0)["rest"]
    return {"first_call_ms": round(first_ms, 3), "first_source": first.source,
            "first_degraded": first.degraded, "later_us": rest.to_json(),
            "breaker": rt.breaker.state, "cloud_failures": rt.cloud_failures}


def run(model: Model, *, calls: int, cloud_calls: int) -> dict[str, Any]:
    """Latency of each fallback situation."""
    from hybridml.edge.fallback import FallbackPolicy
    from hybridml.edge.runtime import EdgeRuntime

    row = odd_row(model)
    policy = FallbackPolicy(cooldown_s=3600)
    local = EdgeRuntime(model.store, model.name, policy=policy)
    res: dict[str, Any] = {"model": model.name}
    res["local_us"] = time_calls({"local": lambda: local.predict([row])},
                                 calls=calls)["local"].to_json()
    log("fallback: live cloud")
    with cloud(model.registry) as server:
        live = EdgeRuntime(model.store, model.name, server.url, policy=policy)
        p = live.predict([row])[0]
        lat = []
        for _ in range(cloud_calls):
            t0 = time.perf_counter()
            live.predict([row])
            lat.append((time.perf_counter() - t0) * 1000)
        res["live_cloud_ms"] = Stats.of(np.asarray(lat)).to_json()
        res["live_cloud_source"] = p.source
        res["live_cloud_reason"] = p.reason
        if live.client is not None:  # a kept-alive connection would hold gunicorn's shutdown
            live.client.close()
    log("fallback: cloud down (refused)")
    # A port bound but not listening refuses connections, and no other process can take it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as closed:
        closed.bind(("127.0.0.1", 0))
        refused = EdgeRuntime(model.store, model.name,
                              f"http://127.0.0.1:{closed.getsockname()[1]}", policy=policy)
        res["refused"] = _first_then_rest(refused, row, calls)
    log("fallback: cloud hung (accepts, never answers)")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(64)
        port = hung.getsockname()[1]
        stuck = EdgeRuntime(model.store, model.name, f"http://127.0.0.1:{port}",
                            policy=policy)
        res["hung"] = _first_then_rest(stuck, row, calls)
        res["hung"]["timeout_ms"] = policy.timeout_ms
    loc = res["local_us"]["median"]
    res["ratio_refused_later_vs_local"] = ratio(res["refused"]["later_us"]["median"], loc)
    res["ratio_hung_later_vs_local"] = ratio(res["hung"]["later_us"]["median"], loc)
    return res
