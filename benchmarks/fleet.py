"""Item 7: a fleet of simulated edge devices against one cloud (gunicorn, 2 workers).

Each device is a real :class:`LocalStore` directory and :class:`CloudClient` driven by the
kit's ``sync()``. Per fleet size N: a rollout (every device syncs for the first time and
downloads the model and table), then steady state (each device does a bounded number of rounds
of one conditional sync — a 304 — and one fallback prediction). A thread pool of fixed size
drives the devices; the cloud's CPU is read from /proc for its whole process group.
"""

from __future__ import annotations

import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .common import Stats, log
from .servers import cloud
from .workspace import Model, provision


class Device:
    """One simulated device: a store and a client."""

    def __init__(self, root: Path, url: str, name: str, i: int, registry: Path) -> None:
        from hybridml.edge.client import CloudClient
        from hybridml.edge.store import LocalStore

        self.store = LocalStore(provision(root / f"dev{i:04d}", registry))
        self.client = CloudClient(url, device=f"dev{i:04d}")
        self.name = name

    def sync(self) -> bool:
        """One sync; True if a new version was activated."""
        from hybridml.edge.sync import sync

        return sync(self.store, self.client, self.name).changed

    def fallback(self, row: Any) -> None:
        """One cloud prediction, as the fallback path sends it."""
        self.client.predict(self.name, [row], 2.0)

    def close(self) -> None:
        """Close the connection pool."""
        self.client.close()


def _drive(devices: list[Device], job: Any, threads: int) -> tuple[list[float], int, float]:
    """Run ``job(device)`` for every device; return latencies (s), errors and wall time."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def one(d: Device) -> None:
        t0 = time.perf_counter()
        try:
            job(d)
        except Exception:  # any failure is an error of the fleet run; counted, not raised
            with lock:
                errors[0] += 1
            return
        with lock:
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, devices))
    return lat, errors[0], time.perf_counter() - t0


def run(model: Model, work: Path, *, sizes: tuple[int, ...], request_budget: int,
        threads: int = 16) -> dict[str, Any]:
    """Rollout and steady-state numbers for each fleet size."""
    row = model.miss_row
    results = []
    with cloud(model.registry) as server:
        for n in sizes:
            log(f"fleet: {n} devices")
            root = work / f"fleet-{n}"
            shutil.rmtree(root, ignore_errors=True)
            devices = [Device(root, server.url, model.name, i, model.registry) for i in range(n)]
            cpu0 = server.cpu_seconds()
            lat, err, wall = _drive(devices, Device.sync, threads)
            cpu1 = server.cpu_seconds()
            rollout = {"syncs": n, "errors": err, "error_rate": round(err / n, 4),
                       "wall_s": round(wall, 3), "syncs_per_s": round(n / wall, 1),
                       "latency_ms": Stats.of(np.asarray(lat) * 1000).to_json(),
                       "cloud_cpu_ms_per_device": round((cpu1 - cpu0) * 1000 / n, 3)}
            rounds = max(1, request_budget // (2 * n))
            s_lat: list[float] = []
            p_lat: list[float] = []
            s_err = p_err = 0
            s_wall = p_wall = 0.0
            cpu0 = server.cpu_seconds()
            for _ in range(rounds):
                lat, e, w = _drive(devices, Device.sync, threads)
                s_lat += lat
                s_err += e
                s_wall += w
                lat, e, w = _drive(devices, lambda d: d.fallback(row), threads)
                p_lat += lat
                p_err += e
                p_wall += w
            cpu1 = server.cpu_seconds()
            steady = {"rounds": rounds, "syncs": rounds * n, "fallbacks": rounds * n,
                      "syncs_per_s": round(rounds * n / s_wall, 1),
                      "fallbacks_per_s": round(rounds * n / p_wall, 1),
                      "error_rate": round((s_err + p_err) / (2 * rounds * n), 4),
                      "sync_latency_ms": Stats.of(np.asarray(s_lat) * 1000).to_json(),
                      "fallback_latency_ms": Stats.of(np.asarray(p_lat) * 1000).to_json(),
                      "cloud_cpu_ms_per_device": round((cpu1 - cpu0) * 1000 / n, 3),
                      "cloud_cpu_ms_per_request": round((cpu1 - cpu0) * 1000
                                                        / (2 * rounds * n), 3)}
            for d in devices:
                d.close()
            shutil.rmtree(root, ignore_errors=True)
            results.append({"devices": n, "rollout": rollout, "steady": steady})
    return {"model": model.name, "threads": threads, "fleets": results}
