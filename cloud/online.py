"""The cloud's ``/predict`` in a rollout: A/B arms by unit, and shadowing the candidate.

Only a request for the default ``stable`` takes part (an explicit ``version`` or ``?alias=``
never does), and only while the model has a running rollout (:meth:`Rollouts.running`,
remembered per thread until anything commits to the registry: a request without a rollout
pays one ``PRAGMA data_version``).

* **A/B** (:meth:`Online.route`): with a ``Hybridml-Unit`` header (1-64 printable
  characters, else a 400 naming the header) the unit ``unit:<header>`` is assigned
  (:meth:`Rollouts.assign`) and answered by its arm's version; the answer says ``"arm"``.
  Without the header the caller gets stable, as always.
* **Shadow** (shadow and canary rollouts): every ⌈1/sample⌉-th stable call (a counter, as on
  the device) hands its rows, encoded batch and answers to :class:`CloudShadow`'s worker
  (a bounded queue of :data:`QUEUE_BATCHES`; full: dropped and counted in ``skipped``), which
  runs the candidate (the app's :class:`~hybridml.cloud.app.ModelCache` predictors) and counts
  what a device counts (docs/rollouts.md §4). The counts are stored in the telemetry store as
  ``shadow`` records of device ``cloud`` (ids ``cloud-<pid>-<random>:<n>``) every
  ``flush_s`` seconds or ``flush_rows`` compared rows, and at :meth:`CloudShadow.close`, so
  the rollout's analysis counts them. The caller never waits on the candidate.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from hybridml.shared.errors import HybridMLError, InputError

from .rollouts import Rollouts

if TYPE_CHECKING:  # onnxruntime loads in workers only (see cloud/app.py)
    from hybridml.edge.session import Outputs
    from hybridml.edge.shadow import ShadowCounts
    from hybridml.shared.schema import EncodedBatch

    from .predictors import ModelCache, Predictor
    from .rollout_types import Rollout
    from .telemetry import TelemetryStore

log = logging.getLogger("hybridml.cloud.online")

UNIT_HEADER = "Hybridml-Unit"
MAX_UNIT = 64
QUEUE_BATCHES = 64
FLUSH_S = 60.0
FLUSH_ROWS = 10_000
DEVICE = "cloud"
SHADOWED = ("shadow", "canary")


@dataclass(frozen=True)
class Route:
    """How one ``/predict`` call is answered: the version, the A/B arm (or None), and the
    shadow plan of a sampled call (or None)."""

    version: int
    arm: str | None = None
    shadow: Rollout | None = None


class Online:
    """The rollout side of ``/predict`` for one app (see the module docstring)."""

    def __init__(self, rollouts: Rollouts, shadow: CloudShadow) -> None:
        self.rollouts = rollouts
        self.shadow = shadow
        self._counters: dict[int, itertools.count[int]] = {}

    def route(self, name: str, stable: Callable[[], int], unit: str | None) -> Route:
        """The route of a call for ``stable`` (``stable()`` resolves it), with the caller's
        ``Hybridml-Unit`` header value ``unit``."""
        r = self.rollouts.running(name)
        if r is None:
            return Route(stable())
        if r.strategy == "ab":
            if unit is None:
                return Route(stable())
            a = self.rollouts.assign(name, "unit:" + check_unit(unit))
            return Route(stable()) if a is None else Route(a.serve, a.arm)
        if r.strategy in SHADOWED and r.candidate is not None:
            version = stable()
            return Route(version, None, r if version == r.stable and self._pick(r) else None)
        return Route(stable())

    def _pick(self, r: Rollout) -> bool:
        """Count a call of ``r``; True for every ⌈1/sample⌉-th one."""
        counter = self._counters.get(r.id)
        if counter is None:
            counter = self._counters.setdefault(r.id, itertools.count(1))
        n = next(counter)
        self.shadow.calls(r, 1)
        sample = float(r.config.sample or 0.0)
        every = 0 if sample <= 0 else max(1, math.ceil(1.0 / sample - 1e-9))
        return every > 0 and n % every == 0


def check_unit(value: str) -> str:
    """A ``Hybridml-Unit`` header: 1-64 printable characters; InputError naming it."""
    if not 0 < len(value) <= MAX_UNIT or not value.isprintable():
        raise InputError(f"the {UNIT_HEADER} header must be 1-{MAX_UNIT} printable characters "
                         "(your stable id for the caller, e.g. a user id)", field=UNIT_HEADER)
    return value


class CloudShadow:
    """Runs the candidate beside ``/predict``'s stable answers and stores what it found.

    ``clock`` (POSIX seconds) dates the windows; ``flush_s``/``flush_rows`` say how often
    the counts become a ``shadow`` record."""

    def __init__(self, models: ModelCache, telemetry: TelemetryStore, *,
                 clock: Callable[[], float] = time.time, flush_s: float = FLUSH_S,
                 flush_rows: int = FLUSH_ROWS, queue_batches: int = QUEUE_BATCHES) -> None:
        self.models = models
        self.telemetry = telemetry
        self.clock = clock
        self.flush_s, self.flush_rows = flush_s, flush_rows
        self._queue: queue.Queue[tuple[Rollout, Predictor, list[Any], EncodedBatch, Outputs]
                                 ] = queue.Queue(maxsize=queue_batches)
        self._lock = threading.Lock()
        self._counts: dict[tuple[int, int, int], ShadowCounts] = {}
        self._calls: dict[tuple[int, int, int], int] = {}
        self._models: dict[tuple[int, int, int], str] = {}
        self._start = clock()
        self._last = clock()
        self._ids = itertools.count(1)
        self._prefix = f"{DEVICE}-{os.getpid()}-{secrets.token_hex(3)}"
        self._thread: threading.Thread | None = None

    def calls(self, r: Rollout, n: int) -> None:
        """Count ``n`` stable calls made while ``r`` runs."""
        key = _key(r)
        with self._lock:
            self._calls[key] = self._calls.get(key, 0) + n

    def submit(self, r: Rollout, served: Predictor, rows: list[Any], batch: EncodedBatch,
               out: Outputs) -> None:
        """Queue a sampled call; a full queue drops it (counted in ``skipped``)."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, daemon=True,
                                                    name="hybridml-cloud-shadow")
                    self._thread.start()
        try:
            self._queue.put_nowait((r, served, rows, batch, out))
            full = False
        except queue.Full:
            full = True
        with self._lock:
            c = self._counts_locked(r, served.manifest.task)
            c.sampled += 1
            c.skipped += full

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until the queued calls are compared; False when ``timeout`` passed first."""
        from hybridml.edge.shadow import drain

        return drain(self._queue, timeout)

    def flush(self) -> list[str]:
        """Store the window's counts as ``shadow`` records; their ids."""
        with self._lock:
            counts, calls = self._counts, self._calls
            self._counts, self._calls = {}, {}
            start, end = self._start, self.clock()
            self._start = self._last = end
        records = []
        for key, c in sorted(counts.items()):
            c.calls += calls.get(key, 0)
            body = c.body(self._models[key], start, end)
            records.append({"id": f"{self._prefix}:{next(self._ids)}", "kind": "shadow",
                            "priority": 1, "body": body})
        if not records:
            return []
        try:
            result = self.telemetry.ingest_summaries(DEVICE, records)
        except HybridMLError as exc:  # the store is down: these counts are lost, said once
            log.warning("cloud shadow records not stored: %s", exc.message)
            return []
        if result.refused:
            log.warning("cloud shadow records refused: %s", result.refused[0]["error"])
        return result.accepted

    def close(self, timeout: float = 5.0) -> None:
        """Compare what is queued (up to ``timeout`` seconds) and flush."""
        self.drain(timeout)
        self.flush()

    # ---------------------------------------------------------------------------- internals
    def _counts_locked(self, r: Rollout, task: str) -> ShadowCounts:
        from hybridml.edge.shadow import ShadowCounts

        key = _key(r)
        c = self._counts.get(key)
        if c is None:
            assert r.candidate is not None
            c = self._counts[key] = ShadowCounts(r.id, "shadow", r.stable, r.candidate, task)
            self._models[key] = r.name
        return c

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=max(0.05, self.flush_s / 4))
            except queue.Empty:
                item = None
            if item is not None:
                try:
                    self._compare(*item)
                except Exception as exc:  # the worker must live
                    log.warning("cloud shadow comparison failed: %s: %s",
                                type(exc).__name__, exc)
                finally:
                    self._queue.task_done()
            with self._lock:
                rows = sum(c.rows + c.errors for c in self._counts.values())
                due = self._counts and (rows >= self.flush_rows
                                        or self.clock() - self._last >= self.flush_s)
            if due:
                self.flush()

    def _compare(self, r: Rollout, served: Predictor, rows: list[Any], batch: EncodedBatch,
                 out: Outputs) -> None:
        from hybridml.edge.shadow import (
            LATENCY_EDGES_MS,
            Alignment,
            compare_classes,
            compare_values,
        )

        assert r.candidate is not None
        task = served.manifest.task
        n = len(rows)
        t0 = time.perf_counter()
        try:
            cand = self.models.get(r.name, r.candidate)
            feed = batch if cand.schema == served.schema else cand.schema.encode(rows)
            got = cand.session.run(feed)
        except HybridMLError as exc:
            log.info("rollout %d: the candidate failed on %d rows: %s", r.id, n, exc.message)
            got = None
        took_ms = (time.perf_counter() - t0) * 1000.0
        if got is not None and task == "regression":
            assert out.values is not None and got.values is not None
            compared = compare_values(out.values, got.values, float(r.config.tolerance or 1e-3))
        elif got is not None:
            assert out.labels is not None and out.probabilities is not None
            assert got.labels is not None and got.probabilities is not None
            compared = compare_classes(Alignment.of(served.classes, cand.classes), out.labels,
                                       out.probabilities, got.labels, got.probabilities)
        with self._lock:
            c = self._counts_locked(r, task)
            c.latency[int(np.searchsorted(LATENCY_EDGES_MS, took_ms, "right"))] += 1
            if got is None:
                c.errors += n
            else:
                c.add(compared)


def _key(r: Rollout) -> tuple[int, int, int]:
    return (r.id, r.stable, r.candidate or 0)


__all__ = ["UNIT_HEADER", "CloudShadow", "Online", "Route", "check_unit"]
