"""``GET /metrics``: Prometheus text that is the same whichever gunicorn worker answers.

``hybridml-cloud serve`` runs several worker processes; a scrape reaches one of them. So
nothing here is per-process state that only one worker knows:

* **What devices reported** — predictions by source, degraded rows, drift per feature, the
  devices reporting, upload and record counts — is read *at scrape time* from the telemetry
  store (:class:`StoreCollector`), the SQLite file every worker shares. Every worker answers
  the same numbers, they survive restarts, and ingest pays nothing extra (its counters are
  bumped in the transaction that stores the records). Drift per feature sums a day of
  summaries, so it is recomputed at most every :data:`DRIFT_CACHE_S` seconds per process.
* **HTTP requests** can only be counted where they happen, in the worker that answered.
  They go through prometheus_client's multiprocess mode: each process writes its counters
  to a memory-mapped file in ``$PROMETHEUS_MULTIPROC_DIR`` and a scrape sums all the files
  (those of workers that died too, so totals never go back). ``serve`` points that variable
  at a fresh private directory before the app or any worker exists
  (:func:`prepare_multiprocess`), and removes it at exit. Without it — Flask's development
  server, an app in a test process — the counter is an ordinary in-process one, which is
  then the whole truth. With an external gunicorn and several workers, set
  ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory yourself (prometheus_client's rule).

Access: open to callers on loopback (a Prometheus on the same host), an admin token
otherwise (:data:`hybridml.cloud.auth.LOOPBACK_ENDPOINTS`).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, request

from hybridml.shared import drift
from hybridml.shared.errors import HybridMLError

from . import fleet

if TYPE_CHECKING:
    from .telemetry import TelemetryStore

log = logging.getLogger("hybridml.cloud.prom")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
DRIFT_WINDOW_S = 86400.0  # drift and "devices reporting" look at the last day
DRIFT_CACHE_S = 30.0
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
LEVELS = {drift.INSUFFICIENT: -1, drift.OK: 0, drift.WARN: 1, drift.ALERT: 2}
_requests: Any = None  # the process's request counter, made on first install
_made = threading.Lock()


def prepare_multiprocess() -> str | None:
    """Before a multi-process server forks: point ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
    private directory (unless the operator set one) that this process removes at exit.

    Returns the directory, or None when prometheus_client was imported already without it
    (the mode is chosen at import; the counter then stays per process, and says so).
    """
    import sys

    given = os.environ.get(MULTIPROC_ENV)
    if given:
        return given
    if "prometheus_client" in sys.modules:
        log.warning("prometheus_client was imported before /metrics was set up: request "
                    "counts on /metrics will be those of the worker that answers")
        return None
    path = tempfile.mkdtemp(prefix="hybridml-metrics-")  # 0700
    os.environ[MULTIPROC_ENV] = path
    owner = os.getpid()

    def remove() -> None:
        if os.getpid() == owner:  # forked workers inherit atexit hooks: only the server
            shutil.rmtree(path, ignore_errors=True)

    atexit.register(remove)
    return path


def install(app: Flask, store: TelemetryStore) -> None:
    """Count every request ``app`` answers, and add ``GET /metrics`` (endpoint
    ``metrics``) serving the request counts and the store's series."""
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, values

    counter = _request_counter()
    exposition = CollectorRegistry(auto_describe=False)
    path = os.environ.get(MULTIPROC_ENV)
    if path and getattr(values.ValueClass, "_multiprocess", False):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(exposition, path)
    else:
        exposition.register(_ProcessCounter(counter))
    exposition.register(StoreCollector(store))
    children: dict[tuple[str, str, int], Any] = {}

    @app.after_request
    def _count(resp: Response) -> Response:
        method = request.method if request.method in METHODS else "other"
        key = (request.endpoint or "unmatched", method, resp.status_code)
        child = children.get(key)
        if child is None:
            child = children.setdefault(key, counter.labels(*key))
        child.inc()
        return resp

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(exposition), mimetype=CONTENT_TYPE_LATEST)


def _request_counter() -> Any:
    global _requests
    with _made:
        if _requests is None:
            from prometheus_client import CollectorRegistry, Counter

            # Its own registry: never the library's global one, which a second app in one
            # process (tests) would register twice.
            _requests = Counter("hybridml_http_requests", "HTTP requests answered, by Flask "
                                "endpoint, method and status", ["endpoint", "method", "status"],
                                registry=CollectorRegistry(auto_describe=False))
        return _requests


class _ProcessCounter:
    """The request counter as a collector, for a server without multiprocess mode."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter

    def collect(self) -> Iterator[Any]:
        """The counter's samples."""
        yield from self.counter.collect()


class StoreCollector:
    """Series read from the telemetry store at scrape time (see the module docstring)."""

    def __init__(self, store: TelemetryStore, *, window_s: float = DRIFT_WINDOW_S,
                 cache_s: float = DRIFT_CACHE_S,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self.store, self.window_s, self.cache_s = store, window_s, cache_s
        self.monotonic = monotonic
        self._drift: tuple[float, list[Any]] | None = None
        self._lock = threading.Lock()

    def collect(self) -> Iterator[Any]:
        """Counters of ingest and traffic, then the cached drift gauges."""
        from prometheus_client.core import CounterMetricFamily

        fams = {
            "predictions": CounterMetricFamily(
                "hybridml_predictions", "Predictions devices reported, by model, version and "
                "source (edge, precomputed, cloud)", labels=["model", "version", "source"]),
            "degraded": CounterMetricFamily(
                "hybridml_predictions_degraded", "Degraded rows devices reported, by reason",
                labels=["model", "version", "reason"]),
            "rows": CounterMetricFamily("hybridml_summary_rows", "Rows in device summaries",
                                        labels=["model", "version"]),
            "uploads": CounterMetricFamily("hybridml_telemetry_uploads",
                                           "Telemetry and feedback uploads", labels=["endpoint"]),
            "records": CounterMetricFamily("hybridml_telemetry_records", "Uploaded records by "
                                           "outcome", labels=["outcome"]),
            "dropped": CounterMetricFamily("hybridml_spool_dropped", "Records devices dropped "
                                           "from their spool before upload", labels=["kind"]),
        }
        outcomes = {"records_accepted": "accepted", "records_duplicate": "duplicate",
                    "records_refused": "refused"}
        for (name, label), value in sorted(self.store.counters().items()):
            if name in outcomes:
                fams["records"].add_metric([outcomes[name]], value)
            elif name in fams:
                fams[name].add_metric(label.split("|") if "|" in label else [label], value)
        yield from fams.values()
        yield from self._drift_families()

    def _drift_families(self) -> list[Any]:
        now = self.monotonic()
        with self._lock:
            if self._drift is not None and now - self._drift[0] < self.cache_s:
                return self._drift[1]
        families = self._compute_drift()
        with self._lock:
            self._drift = (now, families)
        return families

    def _compute_drift(self) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily

        psi = GaugeMetricFamily("hybridml_drift_psi", "PSI of each feature (and of the "
                                "predictions and confidence) over the last day, fleet-wide",
                                labels=["model", "version", "feature"])
        level = GaugeMetricFamily("hybridml_drift_level", "Drift status: -1 insufficient, "
                                  "0 ok, 1 warn, 2 alert", labels=["model", "version", "feature"])
        dataset = GaugeMetricFamily("hybridml_dataset_drift", "1 when the fleet's inputs "
                                    "drifted over the last day (monitoring.md §2)",
                                    labels=["model", "version"])
        devices = GaugeMetricFamily("hybridml_devices_reporting", "Devices that reported "
                                    "within the last day", labels=["model"])
        since = self.store.clock() - self.window_s
        for model in self.store.models():
            found = self.store.summaries(model, since=since)
            devices.add_metric([model], len({s["device"] for s in found}))
            for version in sorted({int(s["version"]) for s in found}):
                try:
                    r = fleet.report(self.store.facts(model, version),
                                     [s for s in found if s["version"] == version],
                                     (since, None))
                except HybridMLError:  # one unreadable version must not break the scrape
                    log.exception("no drift for %s v%d on /metrics", model, version)
                    continue
                entries = [*r["features"], {**r["predictions"], "name": "__predictions__"}]
                if r.get("confidence"):
                    entries.append({**r["confidence"], "name": "__confidence__"})
                for e in entries:
                    labels = [model, str(version), e["name"]]
                    if e.get("psi") is not None:
                        psi.add_metric(labels, e["psi"])
                    level.add_metric(labels, LEVELS.get(e.get("status", ""), -1))
                dataset.add_metric([model, str(version)], 1.0 if r["dataset_drift"] else 0.0)
        return [psi, level, dataset, devices]
